"""``make test-peers``: channels_redis's own tests against our layer.

Downloads the sdist of the installed channels_redis (its ``tests/`` ship in
it) into ``.cache/peers/``, extracts the two test modules, and runs them with
the ``dmb_peers`` plugin (see ``dmb_peers.py``). Arguments are passed to
pytest. If the sdist cannot be downloaded, prints why and exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = REPO / ".cache" / "peers"
TEST_FILES = ("tests/test_core.py", "tests/test_pubsub.py")
#: Per test. channels_redis's own setup.cfg says 10 s; the slowest test
#: sleeps about 5 s, and this machine may be shared.
TIMEOUT = 20


def fetch(wanted: str) -> Path | None:
    """The extracted sdist's directory, or None (and one line saying why)."""
    name = f"channels_redis-{wanted}"
    root = CACHE / name
    if all((root / path).is_file() for path in TEST_FILES):
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"{name}.tar.gz"
    if not sdist.is_file():
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += ["--timeout", "15", "--retries", "1", "--dest", str(CACHE), f"channels_redis=={wanted}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            lines = (done.stderr or done.stdout or "no output").strip().splitlines() or ["no output"]
            print(f"test-peers: skipped, could not download the {name} sdist: {lines[-1]}")
            return None
    with tarfile.open(sdist) as archive:
        for path in TEST_FILES:
            member = archive.getmember(f"{name}/{path}")
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None  # a regular file, checked by getmember
            target.write_bytes(source.read())
    return root


def main(argv: list[str]) -> int:
    wanted = version("channels_redis")
    root = fetch(wanted)
    if root is None:
        return 0
    # tests/peers (the plugin, the deselection list) and tests/ (helpers.BrokerThread)
    paths = [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    command = [sys.executable, "-m", "pytest", "-c", str(HERE / "pytest.ini"), "--rootdir", str(root)]
    command += ["-p", "dmb_peers", f"--timeout={TIMEOUT}", *TEST_FILES, *argv]
    print(f"test-peers: channels_redis {wanted}'s {', '.join(TEST_FILES)} against ChannelsServerLayer", flush=True)
    return subprocess.run(command, env=env, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
