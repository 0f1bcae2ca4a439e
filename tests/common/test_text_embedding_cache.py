"""Embedding cache: misses go through the encoder once, hits come from disk, entries are per encoder."""

import numpy as np

from contentv_common.data.embedding_cache import EmbeddingCache, folder_identity


class CountingEncoder:
    """Deterministic per-prompt arrays; records which prompts it was asked to encode."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        seeds = [sum(p.encode()) + len(p) for p in prompts]
        embeds = np.stack([np.random.default_rng(s).standard_normal((5, 4), dtype=np.float32) for s in seeds])
        return embeds, embeds[:, 0, :3] * 2


def test_hit_and_miss(tmp_path):
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path, "enc-a")
    prompts = ["a cat", "a dog", "a cat", 'quotes " and ünïcode']
    embeds, pooled = cache.encode(prompts, enc)
    assert enc.calls == [["a cat", "a dog", 'quotes " and ünïcode']], "each distinct miss encoded once, in one batch"
    want = enc(prompts)
    np.testing.assert_array_equal(embeds, want[0])
    np.testing.assert_array_equal(pooled, want[1])

    enc.calls.clear()
    again = cache.encode(["a dog", 'quotes " and ünïcode', "a bird"], enc)
    assert enc.calls == [["a bird"]]
    np.testing.assert_array_equal(again[0][:2], embeds[[1, 3]])
    assert cache.get("a fish") is None

    other = EmbeddingCache(tmp_path, "enc-b")
    assert other.get("a cat") is None, "another encoder never reads these entries"
    assert not list(tmp_path.rglob(".tmp-*")), "no temporary files left behind"


def test_damaged_entry_is_a_miss(tmp_path):
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path, "enc")
    cache.encode(["x"], enc)
    cache.path("x").write_bytes(b"garbage")
    assert cache.get("x") is None
    cache.encode(["x"], enc)
    assert enc.calls == [["x"], ["x"]] and cache.get("x") is not None


def test_folder_identity_tracks_configs(tmp_path):
    sub = tmp_path / "text_encoder"
    sub.mkdir()
    (sub / "config.json").write_text('{"hidden_size": 8}')
    a = folder_identity([sub])
    assert a == folder_identity([sub])
    assert a != folder_identity([sub], extra="dtype=bfloat16")
    (sub / "config.json").write_text('{"hidden_size": 16}')
    assert a != folder_identity([sub])
