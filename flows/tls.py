"""Dask TLS credentials as files, for a cluster matdisc does not start itself (the compose file's
scheduler and workers): one self-signed certificate that every role presents and trusts, as
``Security.temporary()`` makes in memory for the local cluster, written once to a folder only its
owner can enter. Whoever lacks it cannot reach the scheduler, which would run their code.

    python -m matdisc_flows.tls DIR    # DIR/ca.pem, DIR/cert.pem, DIR/key.pem (kept if present)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The files, by the ``dask scheduler`` / ``dask worker`` option that takes each.
FILES = {"--tls-ca-file": "ca.pem", "--tls-cert": "cert.pem", "--tls-key": "key.pem"}


def write_credentials(directory: Path) -> dict[str, Path]:
    """{option: path} of the credentials in ``directory``, made when any is missing (a restarted
    compose keeps its cluster's identity); the folder is 0700 and each file 0600."""
    from distributed import Security

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    paths = {option: directory / name for option, name in FILES.items()}
    if all(p.is_file() and p.stat().st_size for p in paths.values()):
        return paths
    made = Security.temporary()
    contents = {
        "--tls-ca-file": made.tls_ca_file,
        "--tls-cert": made.tls_scheduler_cert,
        "--tls-key": made.tls_scheduler_key,
    }
    for option, path in paths.items():
        partial = path.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(contents[option])
        partial.replace(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m matdisc_flows.tls DIR", file=sys.stderr)
        return 2
    for path in write_credentials(Path(args[0])).values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
