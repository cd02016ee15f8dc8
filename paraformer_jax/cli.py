"""What the command-line programs share: flag parsing and errors that read as one message.

A user error (a bad setting, a missing dataset or checkpoint, a refused workdir) is printed
as `error: <message>` on stderr, the fix on its last line, and the program exits with 2; a
traceback helps only for a bug report, so it is kept with --verbose (or PARAFORMER_VERBOSE=1).
"""
from __future__ import annotations

import difflib
import logging as py_logging
import os
import re
import signal
import sys
import traceback

from absl import app, flags, logging

from paraformer_jax import processes
from paraformer_jax.preemption import Interrupted

FLAGS = flags.FLAGS
flags.DEFINE_bool('verbose', False, 'Print the full traceback of an error (for bug reports); '
                  'also PARAFORMER_VERBOSE=1.')

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # a non-finite loss or gradient norm: nothing after the last good save kept


class UserError(Exception):
  """A refusal whose message is complete (raised by the flag parser)."""


# What bad settings and missing inputs raise, in our code and in the libraries we call with
# them (a missing file or bucket, a full disk: OSError). Anything else, KeyError or
# AttributeError included, is taken for a bug and keeps its traceback.
USER_ERRORS = (UserError, ValueError, OSError)


def verbose() -> bool:
  return os.environ.get('PARAFORMER_VERBOSE', '') not in ('', '0') or (
      FLAGS.is_parsed() and FLAGS.verbose)


def message(e: BaseException) -> str:
  """The message of `e` as a user should read it."""
  text = str(e)
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])  # KeyError's str() quotes its argument
  return text.strip() or type(e).__name__


def exit_with(e: BaseException, code: int = EXIT_USER_ERROR, text: str | None = None):
  """The message, its fix on the last line (--verbose, in --help, gives the traceback)."""
  print(f'error: {text or message(e)}', file=sys.stderr, flush=True)
  if processes.several():  # the others may be waiting in a collective: do not wait for them
    processes.exit_now(code)
  sys.exit(code)


def config_field_error(e: AttributeError | KeyError, argv) -> UserError:
  """ml_collections' "'\\'num_brances\\'\\nDid you mean ..." as one line naming the flag."""
  text = message(e)
  asked = text.split('Did you mean')[0]  # where the missing name is
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    flag = arg.split('=')[0]
    parts = flag[len('--config.'):].split('.')
    missing = next((i for i, p in enumerate(parts) if re.search(rf'\b{re.escape(p)}\b', asked)),
                   None)
    if missing is None:
      continue
    hint = re.search(r'Did you mean "([^"]+)"', text)
    fix = (f'did you mean --config.{".".join(parts[:missing] + [hint.group(1)])}?' if hint
           else f'see the fields of config.{".".join(parts[:missing]) or "<top level>"} in '
           f'the config file.')
    return UserError(f'{flag}: the config has no field {parts[missing]!r}; {fix}')
  return UserError(f'{text}\nCheck the --config.* overrides against the config file.')


def parse_flags(argv):
  """absl's parser, with ml_collections' override errors as one line each."""
  for arg in argv[1:]:
    name, _, value = arg.partition('=')
    if name.lstrip('-') in ('config', 'compress_config') and value.endswith('.json'):
      raise UserError(
          f'{arg}: config.json records a run\'s settings; a config is a Python file. Pass '
          f'{value[:-len(".json")]}.py, written beside it (a workdir from before it was '
          f'written: --config=configs/<its config>.py with the overrides config.json lists).')
  try:
    return FLAGS(argv)
  except flags.Error as e:
    raise UserError(_config_file_error(str(e)) or f'{e}\nPass --help for the flags.') from e
  except (AttributeError, KeyError) as e:
    raise config_field_error(e, argv) from e
  except (ValueError, TypeError) as e:
    raise UserError(f'{message(e)}\nCheck the --config.* overrides.') from e


def _config_file_error(text: str) -> str:
  """ml_collections' "Error whilst parsing config file:" and a traceback, as one line: the
  flag and the exception the config file raised."""
  if 'Traceback (most recent call last)' not in text:
    return None
  lines = [l for l in text.splitlines() if l.strip()]
  raised = next(l for l in reversed(lines) if not l.startswith(' '))
  flag = lines[0].split(': Error whilst')[0]
  hint = (' (the text after ":" goes to get_config(); this config takes none)'
          if 'positional argument' in raised else '')
  return f'{flag} does not load: {raised}{hint}. Check the config file and its argument.'


def no_positional_arguments(argv):
  """Refuses words that are not flags (a missing '--', a space inside a value)."""
  if len(argv) > 1:
    raise UserError(f'Unexpected argument(s) {argv[1:]}: every setting is a flag, e.g. '
                    f'--config.seed=1 (a value with spaces goes in quotes); pass --help for '
                    f'the flags.')


def config(name: str = 'config'):
  """The config of flag --`name` (ml_collections loads the file on first access)."""
  value = FLAGS[name].value
  try:
    value.keys()  # a config that failed to load is a placeholder that raises here
  except Exception as e:  # noqa: BLE001 (the placeholder re-raises the loader's error)
    raise UserError(f'--{name}={FLAGS[name].config_filename} does not load: '
                    f'{message(e).splitlines()[-1].strip()}\nPass a config file, e.g. '
                    f'--{name}=configs/digits.py.') from e
  return value


def _parser(argv):
  try:
    return parse_flags(argv)
  except UserError as e:
    exit_with(e)


def run(main):
  """app.run(main), with user errors (while parsing or running) as one message and exit 2."""

  def guarded(argv):
    try:
      result = main(argv)
      processes.finished()
      return result
    except Interrupted as e:  # saved: not an error, but the run did not finish
      processes.finished()
      print(e, file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      if verbose():
        raise
      print('interrupted: stopped at once, without saving; the same command resumes from the '
            'last checkpoint.', file=sys.stderr, flush=True)
      sys.exit(128 + signal.SIGINT)
    except USER_ERRORS as e:
      if verbose():
        raise
      exit_with(e)
    except FloatingPointError as e:  # train.Diverged
      if verbose():
        raise
      exit_with(e, EXIT_DIVERGED)
    except Exception as e:  # noqa: BLE001 (a lost process, or a bug)
      lost = processes.lost_process(e)
      if lost:
        exit_with(e, processes.EXIT_LOST_PROCESS,
                  processes.lost_message(lost, processes.error_cause(e)))
      if not processes.several():
        raise
      traceback.print_exc()  # a bug: its traceback, without waiting for the other processes
      processes.exit_now(1)

  app.run(guarded, flags_parser=_parser)


def closest(name: str, choices) -> str:
  """' Did you mean X?' for the choice closest to `name`, or ''."""
  near = difflib.get_close_matches(name, list(choices), n=1)
  return f' Did you mean {near[0]!r}?' if near else ''


class _QuietLibraries(py_logging.Filter):
  """Keeps our INFO lines, drops the libraries' (Orbax logs a dozen lines per save)."""

  def filter(self, record):
    if 'orbax' in record.pathname and record.exc_info:
      return False  # a traceback of an error that reaches our code, which reports it
    return record.levelno >= py_logging.WARNING or 'paraformer_jax' in record.pathname


class _Short(py_logging.Formatter):
  """'12:00:01 message' ('12:00:01 WARNING: message'), instead of absl's
  'I1123 12:00:01.123456 140234 train.py:254] message'."""

  def format(self, record):
    level = '' if record.levelno <= py_logging.INFO else f'{record.levelname}: '
    text = f'{self.formatTime(record, "%H:%M:%S")} {level}{record.getMessage()}'
    if record.exc_info:
      text += '\n' + self.formatException(record.exc_info)
    return text


def setup_logging():
  """Our INFO lines, short; the libraries' only from WARNING up."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  handler.addFilter(_QuietLibraries())
  handler.setFormatter(_Short())
