"""A divergence is decided on all ranks together: a flag raised on one rank of a gloo group of two reaches
both (each would otherwise stop alone and leave the other waiting), and one process decides alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from medsynth.config import load_config
from medsynth.training.engine import Runtime

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from medsynth.config import load_config
    from medsynth.training.engine import Runtime

    def rank_main(rank, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        rt = Runtime(config=load_config(None), run_dir=".", device=torch.device("cpu"), rank=rank, world_size=2)
        seen = [rt.ranks_with(rank == 1), rt.ranks_with(False), rt.ranks_with(True)]
        dist.destroy_process_group()
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(seen, fh)

    if __name__ == "__main__":
        mp.start_processes(rank_main, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
""")


def test_a_flag_on_one_rank_is_seen_by_every_rank(tmp_path: Path):
    script = tmp_path / "ranks.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "seen"
    subprocess.run([sys.executable, str(script), f"file://{tmp_path / 'rendezvous'}", str(out)], check=True,
                   timeout=120, cwd=Path(__file__).resolve().parents[1])
    for rank in (0, 1):
        assert json.loads(Path(f"{out}.{rank}").read_text()) == [[1], [], [0, 1]]


def test_one_process_decides_alone():
    rt = Runtime(config=load_config(None), run_dir=Path("."), device=torch.device("cpu"))
    assert rt.ranks_with(True) == [0] and rt.ranks_with(False) == []
