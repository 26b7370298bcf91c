"""Bad input files fail with one line naming the file and the place, never a silent misread.

A user's CSV/TSV/JSONL (data/labelled.py), a text corpus (data/sources.py `text_file`), and a
Hugging Face directory's config.json and model.safetensors (hf/load.py, hf/checkpoint.py).
The last tests run main.py: exit 1, one error line, no traceback, no checkpoint written.
"""

import csv
import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_main import assert_one_line_error, main_py

from llmopt_jax.data import intents, labelled, sources
from llmopt_jax.hf import checkpoint
from llmopt_jax.hf.load import read_config

LABELS = ('card_lost', 'refund', 'atm')
ROWS = 91
BROKEN = 42  # the physical line (the header is line 1) whose quote is left open


def write(path, text: str) -> str:
  path.write_bytes(text.encode('utf-8'))
  return str(path)


def named(path) -> str:
  """A regex for an error line that starts with `path`."""
  return '^' + re.escape(str(path))


def simple_rows(quoted: bool = False) -> list[str]:
  """ROWS lines `text,label`, texts optionally in quotes, none holding a quote."""
  text = '"query {} about my account"' if quoted else 'query {} about my account'
  return [f'{text.format(i)},{LABELS[i % 3]}' for i in range(ROWS)]


def open_quote(rows: list[str], how: str) -> list[str]:
  """`rows` with the quote of row BROKEN left open, in three ways a file can show it."""
  rows, i = list(rows), BROKEN - 2
  if how == 'to_the_end':  # no quote after it: the field runs to the end of the file
    rows[i] = '"' + rows[i]
  elif how == 'closed_by_a_quote_in_a_later_text':  # an inch mark ends the field: valid CSV
    rows[i] = '"' + rows[i]
    rows[i + 1] = rows[i + 1].replace(' account,', ' account on my 5",')
  elif how == 'closing_quote_missing':  # every text quoted, one closing quote missing
    rows[i] = rows[i].replace('account"', 'account')
  return rows


def lenient_count(path: str) -> int:
  """Examples the csv module's default (non-strict) parse finds: what used to train."""
  with open(path, newline='', encoding='utf-8') as f:
    return len(list(csv.DictReader(f)))


# ---- CSV/TSV/JSONL -----------------------------------------------------------------------------

@pytest.mark.parametrize('how, rule', [
    ('to_the_end', 'never closed'),                       # csv's strict mode
    ('closing_quote_missing', 'bad quoting'),             # csv's strict mode
    ('closed_by_a_quote_in_a_later_text', 'a whole row'),  # no syntax error: the row check
])
def test_an_unterminated_quote_is_refused_at_the_line_it_opens(tmp_path, how, rule):
  rows = open_quote(simple_rows(quoted=how == 'closing_quote_missing'), how)
  path = write(tmp_path / 'train.csv', 'text,label\n' + '\n'.join(rows) + '\n')
  assert lenient_count(path) < ROWS  # rows merge silently without a strict parse
  with pytest.raises(ValueError, match=named(path) + f', line {BROKEN}: ') as e:
    labelled.load_file(path)
  message = str(e.value)
  assert rule in message and 'quote' in message and '\n' not in message


def test_a_row_with_an_extra_field_is_refused_with_its_line(tmp_path):
  rows = simple_rows()
  rows[9] = 'query 9, about my account,refund'  # an unquoted comma: three fields
  path = write(tmp_path / 'train.csv', 'text,label\n' + '\n'.join(rows) + '\n')
  with pytest.raises(ValueError, match=named(path) + ', line 11: 3 fields where the header has 2'):
    labelled.load_file(path)


@pytest.mark.parametrize('row, problem', [(',refund', "empty value in column 'text'"),
                                          ('query,  ', "empty value in column 'label'")])
def test_an_empty_text_or_label_is_refused_with_its_line(tmp_path, row, problem):
  rows = simple_rows()
  rows[4] = row
  path = write(tmp_path / 'train.csv', 'text,label\n' + '\n'.join(rows) + '\n')
  with pytest.raises(ValueError, match=named(path) + f', line 6: {problem}'):
    labelled.load_file(path)


def test_a_jsonl_line_that_is_not_json_is_refused_with_its_line(tmp_path):
  lines = [json.dumps({'text': f'query {i}', 'label': LABELS[i % 3]}) for i in range(30)]
  lines[6] = '{"text": "query 6", "label": "refund"'  # the closing brace lost
  path = write(tmp_path / 'train.jsonl', '\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=named(path) + ', line 7: not JSON'):
    labelled.load_file(path)


def test_a_jsonl_line_without_a_value_is_refused_with_its_line(tmp_path):
  lines = [json.dumps({'text': f'query {i}', 'label': LABELS[i % 3]}) for i in range(30)]
  lines[3] = json.dumps({'text': None, 'label': 'refund'})
  path = write(tmp_path / 'train.jsonl', '\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=f"^{path}, line 4: column 'text' holds null"):
    labelled.load_file(path)


def test_valid_quoting_loads_every_row_without_a_false_alarm(tmp_path):
  """Quoted commas, quoted line breaks (one followed by a comma and a label's name, but not
  in a row's shape), doubled quotes and CRLF line ends are valid CSV, read as written."""
  rows = simple_rows()
  rows[3] = '"lost it, twice",card_lost'
  rows[5] = '"first line\nsecond line",refund'
  rows[7] = '"Dear bank,\n\nmy card, the atm ate it",atm'
  rows[9] = '"my ""new"" card",card_lost'
  path = write(tmp_path / 'train.csv', 'text,label\r\n' + '\r\n'.join(rows) + '\r\n')
  read = labelled.read_rows(path, 'text', 'label')
  assert len(read) == ROWS
  assert [text for text, _ in read[3:10:2]] == [
      'lost it, twice', 'first line\nsecond line', 'Dear bank,\n\nmy card, the atm ate it',
      'my "new" card']
  assert read[10:] == [(f'query {i} about my account', LABELS[i % 3]) for i in range(10, ROWS)]


def test_a_non_utf8_byte_in_a_csv_names_its_offset_and_line(tmp_path):
  header, row = b'text,label\n', b'query 0,refund\n'
  path = tmp_path / 'train.csv'
  path.write_bytes(header + row + b'caf\xe9 card,atm\n')  # Latin-1 e-acute
  offset = len(header + row) + 3
  with pytest.raises(ValueError, match=named(path) + f': not UTF-8 text: byte 0xe9 at offset '
                                                    f'{offset} \\(line 3\\)'):
    labelled.load_file(str(path))


# ---- Text corpora --------------------------------------------------------------------------------

def test_a_non_utf8_byte_in_a_text_file_names_its_offset(tmp_path):
  good = b'FIRST:\nA speech.\n\nSECOND:\nAnother.\n\n'
  path = tmp_path / 'corpus.txt'
  before = good + b'THIRD:\n'  # seven line breaks: the bad byte is on line 8
  path.write_bytes(before + b'\xff\xfe garbage\n')
  with pytest.raises(ValueError, match=named(path) + f': not UTF-8 text: byte 0xff at offset '
                                                    f'{len(before)} \\(line 8\\)'):
    sources.load_text_source(sources.TEXT_FILE, 'train', data_dir=None, path=str(path))


def test_a_utf16_text_file_is_refused_rather_than_read_as_nul_separated_text(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_bytes('FIRST:\nA speech.\n'.encode('utf-16-le'))  # valid UTF-8, one NUL per char
  with pytest.raises(ValueError, match=named(path) + ': byte 0x00 at offset 1 '):
    sources.load_text_source(sources.TEXT_FILE, 'train', data_dir=None, path=str(path))


# ---- Hugging Face directories --------------------------------------------------------------------

@pytest.fixture
def safetensors_bytes(tmp_path) -> bytes:
  path = str(tmp_path / 'valid.safetensors')
  save_file({'w': np.arange(12, dtype=np.float32).reshape(3, 4)}, path)
  with checkpoint.Reader(path) as reader:  # the untouched file reads
    assert reader.get('w').shape == (3, 4)
  with open(path, 'rb') as f:
    return f.read()


@pytest.mark.parametrize('damage', ['truncated', 'random'])
def test_a_damaged_safetensors_file_is_refused_naming_it(tmp_path, safetensors_bytes, damage):
  model_dir = tmp_path / 'model'
  model_dir.mkdir()
  path = model_dir / checkpoint.SINGLE
  data = (safetensors_bytes[:-8] if damage == 'truncated'
          else np.random.default_rng(0).bytes(len(safetensors_bytes)))
  path.write_bytes(data)
  for where in (str(model_dir), str(path)):  # a directory, or the file itself
    with pytest.raises(ValueError, match=named(path) + ': not a readable safetensors file'):
      checkpoint.Reader(where)


def test_a_malformed_config_json_is_refused_naming_the_file_line_and_column(tmp_path):
  path = write(tmp_path / 'config.json', '{\n  "model_type": "bert",\n  "hidden_size": ,\n}\n')
  with pytest.raises(ValueError, match=named(path) + r': not valid JSON \(.*line 3, column 18\)$'):
    read_config(str(tmp_path))


# ---- The shipped sets, read by the same strict parser ------------------------------------------

def test_shipped_sets_load_with_their_published_sizes():
  banking = intents.load('banking77')
  sizes = {name: len(split) for name, split in banking.splits.items()}
  # Published: 10,003 train and 3,080 test queries; 10% of each intent becomes validation.
  assert sizes['train'] + sizes['validation'] == 10_003 and sizes['test'] == 3_080
  assert banking.num_classes == 77
  clinc = intents.load('clinc150')
  assert {name: len(split) for name, split in clinc.splits.items()} == {
      'train': 15_000 + 100, 'validation': 3_000 + 100, 'test': 4_500 + 1_000}
  assert clinc.num_classes == 151 and clinc.label_names[-1] == 'oos'


# ---- Through main.py -----------------------------------------------------------------------------

@pytest.fixture
def cli_env(tfds_dir) -> dict[str, str]:
  """main.py's environment, as tests/test_main.py sets it: errors take the one-line path."""
  env = {name: value for name, value in os.environ.items() if name != 'LLMOPT_TRACEBACK'}
  return {**env, 'JAX_PLATFORMS': 'cpu', 'TFDS_DATA_DIR': tfds_dir}


def test_main_refuses_a_broken_csv_before_any_checkpoint(cli_env, tmp_path):
  rows = open_quote(simple_rows(), 'closed_by_a_quote_in_a_later_text')
  path = write(tmp_path / 'train.csv', 'text,label\n' + '\n'.join(rows) + '\n')
  workdir = tmp_path / 'run'
  result = main_py(cli_env, '--config=configs/finetune.py:tiny', '--config.data.name=file',
                   f'--config.data.path={path}', f'--workdir={workdir}')
  assert_one_line_error(result, path, f'line {BROKEN}')
  assert not os.path.exists(workdir / 'checkpoints') or not os.listdir(workdir / 'checkpoints')


def test_main_names_the_offset_of_a_bad_byte_in_a_text_corpus(cli_env, tmp_path):
  path = tmp_path / 'corpus.txt'
  good = b'FIRST:\nA speech.\n\nSECOND:\nAnother '
  path.write_bytes(good + b'\x80 one.\n')  # a UTF-8 continuation byte with nothing before it
  result = main_py(cli_env, '--config=configs/pretrain.py:tiny', '--config.data.name=text_file',
                   f'--config.data.path={path}', f'--workdir={tmp_path / "run"}')
  assert_one_line_error(result, str(path), f'offset {len(good)}')
