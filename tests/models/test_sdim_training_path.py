"""SDIM's training path (per-candidate gather, no bucket table) equals the serving path (table + gather)."""

import numpy as np
import torch

from models import FeatureSpec, build_batch, build_ranker
from tests.fixtures import make_behaviors


def test_direct_path_equals_table_path_values_and_gradients():
    r = build_ranker("sdim", spec=FeatureSpec(seq_len=300, item_buckets=1 << 10, category_buckets=64))
    hists = [make_behaviors(n, seed=i) for i, n in enumerate([301, 0, 5, 299, 1, 64, 128])]  # jagged, empty, full
    b = build_batch(hists, np.arange(7), np.arange(7) % 3, r.config.features)
    arch = r.long
    results = []
    for training in (True, False):
        emb = r.embedding(b.hist_item, b.hist_cat).detach().requires_grad_(True)
        tgt = r.embedding(b.cand_item, b.cand_cat).detach()
        arch.train(training)
        enc = arch.encode(emb, b)
        assert ("sdim_sums" in enc) is (not training)
        out, _ = arch(enc, tgt, b)
        out.pow(2).sum().backward()
        results.append((out.detach(), emb.grad))
    (a, ga), (c, gc) = results
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gc, rtol=1e-4, atol=1e-6)
