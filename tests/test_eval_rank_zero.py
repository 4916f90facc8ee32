"""Under torchrun, rank 0 prepares the protocol while the other ranks wait (eval.distributed.rank_zero_first): every
rank learns how it went, and a failure there stops every rank with its message (a user error stays a user error, so
each script exits with status 2) instead of leaving the others at a barrier until its timeout. Which errors are
user errors is utils.cli's rule (the runner passes it; importing it here would cost each process seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval.distributed import rank_zero_first


def _rank(rank: int, init_file: str, out: str) -> None:
    """Three steps on 2 gloo ranks: one that succeeds, one whose rank 0 raises a user error, one a bug."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def failing(error: Exception):
        def step() -> None:
            raise error
        return step

    def is_user_error(exc: BaseException) -> bool:
        return isinstance(exc, (FileNotFoundError, ValueError))

    outcomes = [{"value": rank_zero_first(rank, lambda: "prepared", is_user_error)}]
    for error in (FileNotFoundError("I3D weights not found: i3d_pretrained_400.pt"), RuntimeError("a bug")):
        try:
            rank_zero_first(rank, failing(error), is_user_error)
        except Exception as exc:  # noqa: BLE001 - what each rank would exit with
            outcomes.append({"error": type(exc).__name__, "message": str(exc), "user_error": is_user_error(exc)})
    dist.barrier()  # both ranks got here: nobody hangs
    dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(outcomes))


@pytest.mark.timeout(120)  # a rank left waiting would hang here
def test_every_rank_learns_how_rank_zero_fared(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2))
    assert rank0[0] == {"value": "prepared"} and rank1[0] == {"value": None}
    assert rank0[1] == {"error": "FileNotFoundError", "message": "I3D weights not found: i3d_pretrained_400.pt",
                        "user_error": True}
    assert rank1[1] == {"error": "ValueError", "user_error": True, "message": "rank 0 stopped before generation: "
                        "FileNotFoundError: I3D weights not found: i3d_pretrained_400.pt"}
    assert rank0[2]["error"] == "RuntimeError" and rank1[2] == {
        "error": "RuntimeError", "user_error": False, "message": "rank 0 stopped before generation: RuntimeError: a bug"}
