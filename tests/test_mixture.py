"""Multi-task mixtures: rates by size, temperature or explicit values; a schedule whose every
prefix holds each task within one batch of its rate; exact resume from the saved counts."""

import pytest

from llmopt_jax.data import mixture

SIZES = {'banking77': 9003, 'clinc150': 15000, 'mine': 500}


def test_rates_proportional_temperature_explicit_and_cap():
  prop = mixture.mixture_rates(SIZES, 'proportional')
  total = sum(SIZES.values())
  assert prop == pytest.approx({k: v / total for k, v in SIZES.items()})
  assert mixture.mixture_rates(SIZES, 'temperature', temperature=1.0) == pytest.approx(prop)
  flat = mixture.mixture_rates(SIZES, 'temperature', temperature=1e6)  # T -> inf: uniform
  assert flat == pytest.approx({k: 1 / 3 for k in SIZES}, rel=1e-4)
  t2 = mixture.mixture_rates(SIZES, 'temperature', temperature=2.0)
  root = {k: v ** 0.5 for k, v in SIZES.items()}
  assert t2 == pytest.approx({k: v / sum(root.values()) for k, v in root.items()})
  capped = mixture.mixture_rates(SIZES, 'proportional', cap=1000)
  assert capped == pytest.approx({'banking77': 1000 / 2500, 'clinc150': 1000 / 2500,
                                  'mine': 500 / 2500})
  explicit = mixture.mixture_rates(SIZES, 'explicit', explicit={'banking77': 2, 'clinc150': 1,
                                                               'mine': 1})
  assert explicit == pytest.approx({'banking77': 0.5, 'clinc150': 0.25, 'mine': 0.25})


def test_every_prefix_holds_each_task_within_one_batch_of_its_rate():
  rates = mixture.mixture_rates(SIZES, 'temperature', temperature=2.0)
  mix = mixture.TaskMixture(rates)
  counts = dict.fromkeys(SIZES, 0)
  for n in range(1, 10_001):
    counts[mix.next()] += 1
    for task, rate in rates.items():
      assert abs(counts[task] - rate * n) < 1, (n, task)
  for task, rate in rates.items():  # the check: within 1% over 10k samples
    assert abs(counts[task] / 10_000 - rate) < 0.01


def test_resumed_schedule_equals_the_uninterrupted_one():
  rates = mixture.mixture_rates(SIZES, 'proportional')
  whole = mixture.TaskMixture(rates)
  expected = [whole.next() for _ in range(300)]
  first = mixture.TaskMixture(rates)
  head = [first.next() for _ in range(137)]
  resumed = mixture.TaskMixture(rates, state=first.get_state())
  assert head + [resumed.next() for _ in range(163)] == expected


@pytest.mark.parametrize('kwargs, field', [
    ({'mixing': 'uniformish'}, 'config.mixture.mixing'),
    ({'mixing': 'temperature', 'temperature': 0.0}, 'config.mixture.temperature'),
    ({'mixing': 'proportional', 'cap': -1}, 'config.mixture.cap'),
    ({'mixing': 'explicit', 'explicit': {'banking77': 1, 'clinc150': 1}},
     "config.mixture.rates: no rate for task 'mine'"),
    ({'mixing': 'explicit', 'explicit': {'banking77': 1, 'clinc150': 1, 'mine': 1, 'x': 1}},
     "config.mixture.rates: 'x' is not a task"),
    ({'mixing': 'explicit', 'explicit': {'banking77': -1, 'clinc150': 1, 'mine': 1}},
     'config.mixture: rates must be >= 0'),
])
def test_bad_mixtures_fail_in_one_line_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field.replace('(', r'\(')) as e:
    mixture.mixture_rates(SIZES, **kwargs)
  assert '\n' not in str(e.value)


def test_state_of_other_tasks_is_refused():
  mix = mixture.TaskMixture({'a': 0.5, 'b': 0.5})
  with pytest.raises(ValueError, match='other tasks'):
    mix.set_state({'a': 3, 'c': 1})
