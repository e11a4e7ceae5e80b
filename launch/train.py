"""Training entry point for ``torchrun`` and the ``deepspeed`` launcher (see ``dist_spectral/training``).

    .venv/bin/torchrun --standalone --nproc_per_node=2 launch/train.py --config configs/runs/tiny-olmoe-fsdp.yaml
    .venv/bin/torchrun --standalone --nproc_per_node=2 launch/train.py train.steps=50 optim.recipe=muon
    .venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/runs/tiny-olmoe-zero2.yaml

The ``deepspeed`` launcher passes ``--local_rank=N`` (it also sets ``LOCAL_RANK``, which is what
is read); on a CPU-only machine it starts N local gloo processes without ssh.
"""
import os
import re
import sys
from pathlib import Path

# torchrun puts launch/ (not the checkout) first on sys.path: import this checkout's package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_spectral.training import main  # noqa: E402


def without_local_rank(argv: list[str]) -> list[str]:
    """``argv`` less the launcher's ``--local_rank=N`` / ``--local_rank N`` (kept in ``LOCAL_RANK``)."""
    out, i = [], 0
    while i < len(argv):
        match = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", argv[i])
        if not match:
            out.append(argv[i])
            i += 1
            continue
        value = match.group(1)
        if value is None and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        os.environ.setdefault("LOCAL_RANK", value)
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main(without_local_rank(sys.argv[1:])))
