"""The repository speaks of the product: no account of how it was developed in any tracked file.

A figure's provenance is its command, date, commit and machine; history is git's. This test
applies a short list of words that belong to a development diary (numbered rounds of work,
sittings, which accelerator was at hand, issue numbers) to every file git tracks, and names
the file and line of each.
"""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORBIDDEN = re.compile(
    r"\bsessions?\b|\bsittings?\b|\bissues? ?#?\d+|\bissue's\b"
    r"|\blent\b|\bwas (?:not )?available\b|\bhappened to\b|\bround \d+ of work\b"
    r'|\bearlier (?:run|work) of this\b|\bthis (?:week|morning)\b', re.IGNORECASE)
# Code, not prose: pytest's fixture scope and hook argument, subprocess's keyword.
ALLOWED = re.compile(r"scope=['\"]session['\"]|start_new_session|\(session, config, items\)")
SELF = os.path.relpath(__file__, REPO)
TEXT = ('.py', '.md', '.cfg', '.txt', '.toml', '.sh', '.yml', '.yaml', '.json', '')


def diary_lines(paths):
  """(path, line number, line) of every line with a forbidden word, outside ALLOWED."""
  found = []
  for path in paths:
    if path == SELF or os.path.splitext(path)[1] not in TEXT:
      continue
    try:
      with open(os.path.join(REPO, path), encoding='utf-8') as f:
        lines = f.read().splitlines()
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
      continue
    for number, line in enumerate(lines, 1):
      if FORBIDDEN.search(ALLOWED.sub('', line)):
        found.append((path, number, line.strip()))
  return found


def tracked_files():
  try:
    out = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
  except (OSError, subprocess.CalledProcessError):
    pytest.skip('not a git checkout')
  return out.stdout.split()


def test_no_tracked_file_tells_how_the_project_was_developed():
  found = diary_lines(tracked_files())
  assert not found, 'words of a development diary (say the command, date, commit and ' \
      'machine instead):\n' + '\n'.join(f'{p}:{n}: {line}' for p, n, line in found)


def test_the_word_list_catches_the_diary_and_lets_the_code_through(tmp_path):
  sample = tmp_path / 'sample.md'
  sample.write_text('fine line\nmeasured in session 8\n@pytest.fixture(scope="session")\n'
                    "Against the issue's targets\nsubprocess.Popen(start_new_session=True)\n"
                    'fixed in issue 12\na GPU was available\n')
  found = diary_lines([os.path.relpath(sample, REPO)])
  assert [n for _, n, _ in found] == [2, 4, 6, 7]
