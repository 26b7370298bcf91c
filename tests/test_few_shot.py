"""Tests of few-shot training sets (llmopt_jax/data/few_shot.py) on Banking77 and on toy splits.

Subsets are compared as multisets of (text, label) rows: the comparisons are exact."""

import collections

import numpy as np
import pytest

from llmopt_jax.data import few_shot, intents
from llmopt_jax.data.few_shot import FewShotConfig
from llmopt_jax.data.labelled import Split


@pytest.fixture(scope='module')
def banking77():
  return intents.banking77()


def rows(split: Split) -> collections.Counter:
  return collections.Counter(zip(split.texts, split.labels.tolist()))


def test_exactly_k_per_class_and_the_rest_unlabelled(banking77):
  train = banking77['train']
  cut = few_shot.select(train, 10, seed=0, num_classes=77)
  np.testing.assert_array_equal(np.bincount(cut.labelled.labels, minlength=77), [10] * 77)
  assert cut.short == {}
  assert rows(cut.labelled) + rows(cut.unlabelled) == rows(train)  # disjoint, and all of it
  assert len(cut.labelled) + len(cut.unlabelled) == len(train)
  assert not set(rows(cut.labelled)) & set(rows(cut.unlabelled))


def test_stable_for_a_seed_different_across_seeds_and_nested_in_k(banking77):
  train = banking77['train']
  select = lambda k, seed: few_shot.select(train, k, seed, 77).labelled  # noqa: E731
  assert select(10, 0).texts == select(10, 0).texts
  np.testing.assert_array_equal(select(10, 0).labels, select(10, 0).labels)
  assert set(rows(select(10, 0))) != set(rows(select(10, 1)))
  overlap = len(set(rows(select(10, 0))) & set(rows(select(10, 1))))
  assert overlap < 200  # two draws of 10 of ~117 per class share ~1 per class, not most
  assert set(rows(select(5, 3))) <= set(rows(select(10, 3)))


def test_classes_with_fewer_than_k_keep_all_and_are_named():
  labels = np.array([0] * 8 + [1] * 3 + [2] * 5, np.int32)
  split = Split(tuple(f'q{i}' for i in range(len(labels))), labels)
  cut = few_shot.select(split, 5, seed=0, num_classes=4)  # class 3 has no example at all
  np.testing.assert_array_equal(np.bincount(cut.labelled.labels, minlength=4), [5, 3, 5, 0])
  assert cut.short == {1: 3, 3: 0}
  config = FewShotConfig(shots=5)
  line = config.describe_short(cut, ('a', 'b', 'c', 'd'))
  assert line == ('config.data.shots_per_class=5: 2 classes have fewer training examples and '
                  'keep all they have: b (3), d (0)')
  assert config.describe_short(few_shot.select(split, 2, 0, 3), ('a', 'b', 'c')) == ''


def test_only_train_is_cut_and_the_cut_is_recorded(banking77):
  cut_splits, cut = FewShotConfig.from_config({'shots_per_class': 4}, run_seed=5).apply(banking77)
  assert cut_splits['validation'] is banking77['validation']
  assert cut_splits['test'] is banking77['test']
  assert cut_splits['train'] is cut.labelled and len(cut.labelled) == 4 * 77
  facts = cut_splits.metadata()
  assert facts['sizes']['train'] == 308
  assert facts['train'] == (f'4 per class of the train split, seed 5 (308 examples; '
                            f'{len(banking77["train"]) - 308} left unlabelled)')
  assert 'train' not in banking77.metadata()
  same, none = FewShotConfig.from_config({}, run_seed=5).apply(banking77)  # off by default
  assert same is banking77 and none is None


def test_the_seed_is_the_runs_unless_pinned():
  assert FewShotConfig.from_config({'shots_per_class': 3}, run_seed=9).seed == 9
  pinned = {'shots_per_class': 3, 'shots_seed': 2}
  assert FewShotConfig.from_config(pinned, run_seed=9).seed == 2


@pytest.mark.parametrize('fields, error', [
    ({'shots_per_class': -1}, r'config.data.shots_per_class=-1 must be an integer >= 0'),
    ({'shots_per_class': True}, r'config.data.shots_per_class=True must be an integer'),
    ({'shots_per_class': '10'}, r"config.data.shots_per_class='10' must be an integer"),
    ({'shots_seed': -2}, r'config.data.shots_seed=-2 must be an integer >= 0, or -1'),
])
def test_bad_settings_are_one_line_errors_naming_the_field(fields, error):
  with pytest.raises(ValueError, match=error) as raised:
    FewShotConfig.from_config(fields, run_seed=0)
  assert '\n' not in str(raised.value)
