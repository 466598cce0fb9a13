import json

import torch

from rlvr_entropy import diagnostics as D
from rlvr_entropy import diagnostics_plots as P


def _records(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 50, 6, generator=g, dtype=torch.float64)
    a = torch.randint(6, (1, 50), generator=g)
    adv = torch.randn(1, 50, generator=g, dtype=torch.float64)
    probe = D.EntropyChangeProbe()
    probe.before(z, a, adv, torch.ones(1, 50, dtype=torch.bool), adv)
    rec = probe.after(z + 0.01 * torch.randn(z.shape, generator=g, dtype=torch.float64))
    path = tmp_path / "entropy_change.jsonl"
    path.write_text(json.dumps(rec.to_json()) + "\n")
    return P.load_probe_records(path)


def test_plots_write_pngs(tmp_path):
    recs = _records(tmp_path)
    assert len(recs) == 1 and "exact/pearson" in recs[0]["report"]
    for f in (P.scatter_predicted_vs_measured(recs, tmp_path / "a.png"), P.quadrant_bars(recs, tmp_path / "b.png"),
              P.entropy_percentiles([{"step": i, "entropy/p50": 1.0 / (i + 1), "entropy/p90": 2.0} for i in range(5)],
                                    tmp_path / "c.png")):
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert P.load_probe_records(tmp_path / "missing.jsonl") == []
