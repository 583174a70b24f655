"""The decoding benchmark runs, and what it reports of the state is true: a Transformer's
key/value cache grows with the context, a self-referential memory's state does not (beyond
the writes buffered for an unfinished chunk)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script


def test_generate_throughput_reports_state_growth(tmp_path: Path) -> None:
    bench = load_script("benchmarks/generate_throughput.py")
    out = tmp_path / "gen.json"
    assert bench.main(["--configs", "transformer/pilot_smoke:model.n_layers=1,hope/pilot_smoke:model.n_layers=1",
                       "--contexts", "16,64", "--decode-tokens", "3", "--prefill-chunk", "24",
                       "--threads", "1", "--out", str(out)]) == 0
    rows = {(r["config"].split("/")[0], r["context"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("transformer", 64)]["state_mb"] > 3 * rows[("transformer", 16)]["state_mb"]
    assert rows[("hope", 64)]["state_mb"] < 1.25 * rows[("hope", 16)]["state_mb"]  # bounded: a chunk's buffer
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows.values())
