"""tools/sample.py --seeds: a prompt suite named as VBench names it, split over processes without gap or repeat,
resumed by skipping whole files, each video the one its prompt and seed give alone."""

import numpy as np
import pytest

import contentv_torch_npu.backend as torch_backend
from contentv_common.cli import sample as sample_tool
from contentv_common.data.video_io import read_video
from contentv_common.errors import ConfigError
from contentv_common.prompt_suite import CUT_CHARS, Pair, SamplingGroups, share, suite_pairs, suite_rows, video_name

TINY = ["--tiny", "--backend", "torch", "--frames", "1", "--size", "32x32", "--steps", "1", "--guidance", "3"]
TINY += ["--negative-prompt", "blurry", "--seed", "7", "--no-progress"]
AWKWARD = ["A 3D model of a 1800s victorian house.", 'the city of Petra\'s façades, "rock-carved" 100%']


def test_video_names_are_vbench_names():
    assert video_name(AWKWARD[0], 3) == "A 3D model of a 1800s victorian house.-3.mp4"  # VBench's README example
    assert video_name(AWKWARD[1], 0) == 'the city of Petra\'s façades, "rock-carved" 100%-0.mp4'
    vbench_longest = "x" * 210  # VBench's all_dimension.txt: at most 210 characters, looked up whole
    assert video_name(vbench_longest, 4) == f"{vbench_longest}-4.mp4"
    long = "a" * 170 + "b" * 30 + " and more" * 10  # VBench-2.0: names over the limit keep 180 characters
    assert video_name(long, 19) == "a" * 170 + "b" * 10 + "-19.mp4"
    for bad, message in (("AC/DC on stage", "'/'"), ("漢" * 200, f"first {CUT_CHARS} characters")):
        with pytest.raises(ValueError, match=message):
            video_name(bad, 0)


def test_suite_pairs_dedupe_repeats_and_refuse_clashing_names():
    pairs = suite_pairs(["a cat", "a dog", "a cat"], 2)
    assert pairs == [Pair("a cat", 0, "a cat-0.mp4"), Pair("a cat", 1, "a cat-1.mp4")] + [
        Pair("a dog", i, f"a dog-{i}.mp4") for i in range(2)
    ]
    head = "z" * 250
    with pytest.raises(ValueError, match="would both be"):
        suite_pairs([head + " one", head + " two"], 1)
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        suite_pairs(["a cat"], 0)


def test_shares_cover_every_pair_exactly_once():
    pairs = suite_pairs([f"prompt {i}" for i in range(7)], 3)
    for groups in range(1, 6):
        shares = [share(pairs, g, groups) for g in range(groups)]
        names = [p.name for s in shares for p in s]
        assert sorted(names) == sorted(p.name for p in pairs) and len(set(names)) == len(pairs)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        share(pairs, 2, 2)


def _frames(path):
    frames, _ = read_video(path)
    return frames.astype(int)


def test_suite_over_two_ranks_resumes_and_matches_lone_videos(tmp_path, monkeypatch, capsys):
    """Two torchrun ranks (RANK / WORLD_SIZE) write the suite together; a file already there is kept as it is, a
    killed write's temporary file is not taken for a video; every video equals its prompt sampled alone."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([AWKWARD[0], "", AWKWARD[1], AWKWARD[0]]) + "\n")
    out = tmp_path / "suite"
    out.mkdir()
    names = [video_name(p, i) for p in AWKWARD for i in range(2)]
    (out / names[0]).write_bytes(b"written by a run that was killed later")  # rank 0's first pair: done
    (out / ".tmp-x1y2.partial").write_bytes(b"half a video")  # a write killed before its rename
    suite = [*TINY, "--prompts-file", str(prompts), "--seeds", "2", "--out", str(out)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = {}
    for rank, extra in ((0, []), (1, ["--batch-size", "2"])):
        monkeypatch.setenv("RANK", str(rank))
        written[rank] = [p.name for p in sample_tool.main([*suite, *extra])]
        assert (
            f"process {rank} of 2 wrote {len(written[rank])}, skipped {1 - rank} already there"
            in capsys.readouterr().out
        )
    assert written == {0: [names[2]], 1: [names[1], names[3]]}  # rank r: pairs r, r + 2 of 4
    assert (out / names[0]).read_bytes() == b"written by a run that was killed later"
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(names)

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch_backend.TorchBackend, "load_transformer", _forbidden)  # nothing left: no model
    assert sample_tool.main(suite) == [] and "wrote 0, skipped 4 already there" in capsys.readouterr().out
    monkeypatch.undo()

    # pair (prompt, i) is `--prompt PROMPT --seed 7+i`: exactly for a batch of one, within a level for a batch of two
    alone = sample_tool.main([*TINY, "--prompt", AWKWARD[1], "--prompt", AWKWARD[1], "--out", str(tmp_path / "alone")])
    assert np.array_equal(_frames(alone[0]), _frames(out / names[2]))
    assert np.abs(_frames(alone[1]) - _frames(out / names[3])).mean() <= 0.5
    assert np.abs(_frames(out / names[2]) - _frames(out / names[3])).mean() > 1, "seed indices differ"


def _forbidden(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_bad_suites_stop_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch_backend.TorchBackend, "load_transformer", _forbidden)
    monkeypatch.setattr(torch_backend.TorchBackend, "encoders", _forbidden)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="empty.txt: no prompts in it"):
        sample_tool.main([*TINY, "--prompts-file", str(tmp_path / "empty.txt"), "--seeds", "2"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv, message in (
        ([*TINY, "--prompt", "a cat", "--seeds", "0"], "--seeds must be >= 1"),
        ([*TINY, "--prompt", "AC/DC", "--seeds", "1"], "'/'"),
        ([*TINY, "--prompt", "a cat"], "2 processes would all write the same files: give --seeds N"),
    ):
        with pytest.raises(SystemExit) as stop:
            sample_tool.main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1]


def test_jax_processes_are_the_suite_groups(monkeypatch):
    """JAX without a mesh: each process is its own group (a plain machine: alone), and writes it."""
    import jax

    from contentv_common.backend import get

    groups = get("jax").join_sampling("auto")
    assert (groups.process, groups.owners, groups.sampled, groups.together) == (0, (0,), [0], False)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    groups = get("jax").join_sampling("auto")
    assert (groups.process, groups.owners, groups.sampled, groups.written) == (1, (0, 1), [1], [1])


def test_a_mesh_samples_every_groups_pairs_in_each_forward():
    """With a mesh the forward's rows are the groups' pairs in group order, `per` each; a group out of pairs repeats
    one, marked None (not written)."""
    pairs = suite_pairs(["a", "b", "c"], 1)
    todo = [share(pairs, g, 2) for g in range(2)]  # group 0: a, c; group 1: b
    rows = suite_rows(todo, 1)
    assert [[(p.prompt, g) for p, g in batch] for batch in rows] == [[("a", 0), ("b", 1)], [("c", 0), ("a", None)]]
    assert [[p.prompt for p, _ in batch] for batch in suite_rows(todo[:1], 2)] == [["a", "c"]]
    groups = SamplingGroups(process=1, processes=2, owners=(0, 1, 1), together=True)
    assert groups.sampled == [0, 1, 2] and groups.written == [1, 2]
