"""Where a run reads and writes: local directories and object stores (gs://...) alike.

Every path a run touches goes through `etils.epath` (gs:// by gcsfs; Orbax's arrays by
tensorstore), so a workdir in a bucket works as a local one does. An object store writes an
object whole when it is closed, so a file written in one piece is never seen half-written;
locally the same guarantee needs a temporary file and a rename (`write_atomic`).
"""
from __future__ import annotations

import os
import threading

from etils import epath

PROBE_TIMEOUT_S = 60.0  # gcsfs retries an unreachable endpoint for ~35 s before it gives up


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def path(p) -> epath.Path:
  """An epath.Path; local paths made absolute (Orbax wants them so)."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def write_atomic(target, data: str | bytes):
  """Writes `target` so that no reader (another host, a resumed run) sees it half-written."""
  target = path(target)
  mode = 'w' if isinstance(data, str) else 'wb'
  if is_remote(target):
    with target.open(mode) as f:  # the object appears, whole, when the upload completes
      f.write(data)
    return
  tmp = target.parent / (target.name + '.tmp')
  with tmp.open(mode) as f:
    f.write(data)
  os.replace(tmp, target)


def _bucket(p: epath.Path) -> epath.Path:
  scheme, rest = os.fspath(p).split('://', 1)
  return epath.Path(f'{scheme}://{rest.split("/", 1)[0]}')


def check_access(p, what: str, timeout_s: float | None = None):
  """Fails fast, naming `what` (e.g. '--workdir') and what to set, if a remote path's
  bucket cannot be reached; local paths pass untouched.

  Done before training: otherwise the first checkpoint, minutes in, is where a missing
  credential or a wrong endpoint would show up.
  """
  if not is_remote(p):
    return
  bucket = _bucket(path(p))
  timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
  answer = {}

  def probe():  # a daemon thread: a hung probe must not hold the process at exit
    try:
      answer['exists'] = bucket.exists()
    except Exception as e:  # gcsfs/aiohttp/google-auth raise many types for one cause
      answer['error'] = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0]}'

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    problem = f'no answer from the storage endpoint within {timeout_s:g} s'
  elif 'error' in answer:
    problem = answer['error']
  else:
    problem = None if answer['exists'] else f'the bucket {bucket} does not exist'
  if problem is None:
    return
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  where = (f'the emulator at STORAGE_EMULATOR_HOST={emulator} (Orbax also needs '
           f'TENSORSTORE_GCS_HTTP_URL, and datasets CLOUD_STORAGE_EMULATOR_ENDPOINT, set to '
           f'it)' if emulator else 'Google Cloud Storage')
  raise OSError(
      f'{what}={os.fspath(p)} cannot be used: {problem}. It was read through {where}. '
      f'Check the bucket name and the credentials: on a TPU VM the VM\'s service account '
      f'needs access to the bucket; elsewhere run `gcloud auth application-default login` '
      f'or set GOOGLE_APPLICATION_CREDENTIALS to a key file.')


def make_writable_dir(p, what: str):
  """Makes directory `p` (and its parents), refusing in one line, with the fix, one that
  cannot be written: a read-only filesystem, no permission, no space for a file."""
  p = path(p)
  try:
    p.mkdir(parents=True, exist_ok=True)
    if not is_remote(p):
      if os.statvfs(p).f_flag & os.ST_RDONLY:
        raise OSError(30, 'Read-only file system')
      if not os.access(p, os.W_OK):
        raise OSError(13, 'Permission denied')
  except OSError as e:
    raise OSError(f'{what}={os.fspath(p)} cannot be written ({e.strerror or e}); pass a '
                  f'directory on a disk or bucket this process may write to.') from e
