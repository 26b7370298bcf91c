"""What a stage tells its user: progress lines and its report, from the first process only.

Every stage ends with `write`: `report.json` (the whole record, machine-readable) and
`report.md` (a title, one table rendered from the same rows, and notes), both replaced
atomically so a reader never sees half a report, and the table printed. `say` is the one
progress printer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from llmopt_jax import compare


def say(message: str) -> None:
  """A progress line, from the first process only."""
  if jax.process_index() == 0:
    print(message, flush=True)


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of a report table: its header and its cell, rendered from a row."""
  header: str
  cell: Callable[[Mapping[str, Any]], str]


def field(header: str, key: str, spec: str = '') -> Column:
  """A column showing `row[key]`, formatted with `spec` (e.g. '.4f', ',')."""
  return Column(header, lambda row: format(row[key], spec))


def write(workdir: str, record: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
          columns: Sequence[Column], *, title: str = '', notes: Sequence[str] = (),
          headline: str = '') -> None:
  """report.json (`record`, which holds `rows` or the figures they show) and report.md (the
  rows as a table under `title`, then `notes`); prints `headline` and the table."""
  if jax.process_index() != 0:
    return
  table = compare.markdown_table([c.header for c in columns],
                                 [[c.cell(row) for c in columns] for row in rows])
  text = (f'# {title}\n\n' if title else '') + table + ''.join(f'\n{n}\n' for n in notes)
  _replace(os.path.join(workdir, 'report.json'), json.dumps(record, indent=2))
  _replace(os.path.join(workdir, 'report.md'), text)
  print('\n' + (headline + '\n\n' if headline else '') + table
        + f'Report in {workdir}/report.md', flush=True)


def _replace(path: str, text: str) -> None:
  # A name of this process's own: sweep workers may write the same report at once.
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


def write_metrics(workdir: str, record: Mapping[str, Any], rows: Sequence[tuple[str, str]],
                  headline: str = '') -> None:
  """report.json (`record`) and report.md as a metric | value table of `rows`."""
  write(workdir, record, [{'metric': k, 'value': v} for k, v in rows],
        [field('metric', 'metric'), field('value', 'value')], headline=headline)


def fine_tune_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
  """The rows every fine-tune's report ends with: best step, parameters, wall time."""
  return [('best step', str(record['best_step'])),
          ('trainable / total parameters',
           f'{record["trainable_params"]:,} / {record["total_params"]:,}'),
          ('wall time', f'{record["wall_time_s"]:.0f} s')]


def plot(path: str, series: Mapping[str, Sequence[tuple[float, float]]], *, x_label: str,
         y_label: str, title: str = '') -> None:
  """A PNG line plot at `path`: one line per series of (x, y) points, written atomically
  beside the table it illustrates."""
  if jax.process_index() != 0:
    return
  import matplotlib  # imported here: only stages that plot pay for it
  matplotlib.use('Agg')
  from matplotlib import pyplot
  figure, axes = pyplot.subplots(figsize=(6, 4), dpi=120)
  for label, points in series.items():
    xs, ys = zip(*sorted(points), strict=True)
    axes.plot(xs, ys, marker='o', label=label)
  axes.set_xlabel(x_label)
  axes.set_ylabel(y_label)
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend(fontsize='small')
  figure.tight_layout()
  tmp = path + '.tmp.png'
  figure.savefig(tmp)
  pyplot.close(figure)
  os.replace(tmp, path)
