"""The run summary and who sees what: the hop's public line, the holder's own metrics, the run's totals."""

from __future__ import annotations

import json
import math

from gtbus.messages.types import HOP_PUBLIC_FIELDS, RUN_PUBLIC_FIELDS, SNAPSHOT_PUBLIC_FIELDS
from gtbus.nodes.run_summary import HopResult, hop_progress, hop_record, jsonable, public_snapshot, public_summary, run_summary


def _hops() -> list[HopResult]:
    return [
        HopResult(1, 0, "h1", 0, "travel", "trained", nbytes=1000, provision_s=0.5, open_s=0.5, train_s=3.0, eval_s=0.25,
                  eval_before=5.0, eval_after=4.0),
        HopResult(2, 0, "h2", 0, "travel", "revoked", nbytes=0, provision_s=9.0, detail="lease expired"),
        HopResult(3, 0, "h1", 1, "travel", "trained", nbytes=3000, provision_s=1.0, train_s=1.0, eval_s=0.25,
                  eval_before=3.5, eval_after=None),
    ]


def test_totals_count_only_trained_hops() -> None:
    s = run_summary(_hops(), run_id="r", mode="travel", device="host:x", first_eval=5.0, last_eval=3.5, last_epoch=3, logs="L")
    assert (s["hops"], s["hops_trained"], s["outcomes"]) == (3, 2, {"revoked": 1, "trained": 2})
    assert (s["bytes_provisioned"], s["transfer_s"], s["train_s"], s["eval_s"]) == (4000, 2.0, 4.0, 0.5)
    assert math.isclose(s["transfer_share"], 2.0 / 6.0) and math.isclose(s["provision_gbps"], 4000 / 2.0 / 1e9)
    assert (s["first_loss"], s["last_loss"], s["final_train_loss"]) == (5.0, 3.5, None)
    assert list(s)[-2:] == ["last_epoch", "logs"]  # what only the node knows comes last, as given
    json.dumps(s)


def test_a_run_with_nothing_trained_divides_by_nothing() -> None:
    s = run_summary(_hops()[1:2], run_id="r", mode="ship", device="d", first_eval=None, last_eval=None)
    assert (s["transfer_share"], s["provision_gbps"], s["hops_trained"], s["final_train_loss"]) == (0.0, 0.0, 0, None)


def test_everyone_sees_only_the_public_parts() -> None:
    record, public = hop_record(_hops()[0])
    assert set(public) == set(HOP_PUBLIC_FIELDS) and record["eval_before"] == 5.0 and "eval_before" not in public
    s = run_summary(_hops(), run_id="r", mode="travel", device="d", first_eval=5.0, last_eval=3.5, checkpoint="/c")
    assert set(public_summary(s)) == set(RUN_PUBLIC_FIELDS) - {"last_epoch", "skipped"}
    assert "first_loss" not in public_summary(s) and "checkpoint" not in public_summary(s)
    state = {"run_id": "r", "last_loss": 3.5, "bytes": 4000, "secret": 1}
    assert public_snapshot(state) == {"run_id": "r", "bytes": 4000} and set(public_snapshot(state)) <= SNAPSHOT_PUBLIC_FIELDS


def test_hop_progress_is_what_the_snapshot_counts() -> None:
    assert hop_progress(_hops()) == {"hops": 3, "hops_trained": 2, "bytes": 4000, "last_loss_epoch": 3}
    assert hop_progress([]) == {"hops": 0, "hops_trained": 0, "bytes": 0, "last_loss_epoch": None}


def test_published_values_are_json_scalars() -> None:
    assert jsonable({"a": 1, "b": None, "c": (1, 2), "d": b"x", "e": 1.5}) == {"a": 1, "b": None, "c": "(1, 2)", "d": "b'x'", "e": 1.5}
    assert HopResult(1, 0, "h", 0, "travel", "trained", provision_s=0.25, open_s=0.5).transfer_s == 0.75
