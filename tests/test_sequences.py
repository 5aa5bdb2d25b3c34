"""Moving-digit sequences: generators (deterministic, the promised motion), the 001 metrics on hand-made frames,
bad inputs as one-line errors, and a tiny next-frame model trained and sampled through the CLI with and without PG."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import pixels, call_cli, write_idx
from diffcli.shared.errors import DiffcliError
from diffcli.data.contexts import read_context
from diffcli.data.sequences import (SequenceSpec, centroid, check_spec, circle_shifts, draw_track, iou, make_dataset,
                                    make_item, sequence_metrics)


SIZE = 16  # frames; digits are 8 px


def fake_digits(n: int = 24, seed: int = 0) -> torch.Tensor:
    """(n, d, d) uint8 'digits': an L of random stroke lengths, so a shape is never symmetric."""
    rng = np.random.default_rng(seed)
    d = SIZE // 2
    out = np.zeros((n, d, d), np.uint8)
    for i in range(n):
        out[i, 1:d - 1, 1:3] = 255
        out[i, d - 3:d - 1, 1:rng.integers(4, d)] = 255
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """A fake MNIST test split in IDX format (28x28 L shapes), read by the real loader."""
    root = tmp_path_factory.mktemp("mnist")
    imgs = np.zeros((20, 28, 28), np.uint8)
    for i in range(20):
        imgs[i, 4:24, 6:11] = 255
        imgs[i, 19:24, 6:12 + i % 10] = 255
    write_idx(root / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return root


def shift_of(frame: torch.Tensor, last: torch.Tensor) -> tuple[float, float]:
    return tuple(round(v, 6) for v in (centroid(frame.double()) - centroid(last.double())).tolist())


# ---------------------------------------------------------------- generators

@pytest.mark.parametrize("kind", ["moving-mnist", "circle-jumping", "horizontal"])
def test_generators_are_deterministic_by_seed(kind):
    digits = fake_digits()
    spec = SequenceSpec(kind, frame_size=SIZE, context_frames=3, step_size=2)
    a, b = make_dataset(spec, digits), make_dataset(spec, digits)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (24, 3, SIZE, SIZE) and a[1].shape == (24, 1, SIZE, SIZE)
    other = make_dataset(SequenceSpec(kind, frame_size=SIZE, context_frames=3, step_size=2, seed=1), digits)
    assert not torch.equal(torch.cat(a, 1), torch.cat(other, 1))
    # item i does not depend on how many items were made
    it = make_item(spec, digits[5], 5)
    assert torch.equal(it.context, a[0][5]) and torch.equal(it.target, a[1][5])


def test_circle_jumping_jumps_to_one_of_k_points():
    spec = SequenceSpec("circle-jumping", frame_size=SIZE, context_frames=3, step_size=4, directions=4)
    digits = fake_digits()
    ring = {tuple(map(float, s)) for s in circle_shifts(4, 4)}
    assert ring == {(0.0, 4.0), (-4.0, 0.0), (0.0, -4.0), (4.0, 0.0)}
    centre = float(spec.span // 2)
    seen = set()
    for i in range(60):
        it = make_item(spec, digits[i % 24], i)
        t = draw_track(spec, i)
        assert t.context[-1].tolist() == [centre, centre] and t.context[0].tolist() == [centre, centre]
        assert tuple(map(float, t.context[1] - t.context[2])) in ring  # out and back
        seen.add(shift_of(it.target[0], it.context[-1]))
        assert len(it.futures) == 4 and torch.allclose(it.probs, torch.full((4,), 0.25))
    assert seen == ring  # every direction occurs, nothing else


def test_horizontal_moves_left_with_probability_p():
    digits = fake_digits()
    spec = SequenceSpec("horizontal", frame_size=SIZE, context_frames=2, step_size=2, p_left=0.25)
    shifts = [shift_of(make_item(spec, digits[i % 24], i).target[0], make_item(spec, digits[i % 24], i).context[-1])
              for i in range(400)]
    assert set(shifts) == {(0.0, -2.0), (0.0, 2.0)}
    left = sum(s[1] < 0 for s in shifts) / len(shifts)
    assert abs(left - 0.25) < 0.07
    t = draw_track(spec, 0)  # arrives at the centre from one side at `step` px a frame
    assert (t.context[1] - t.context[0]).abs().tolist() == [0, 2]
    only_left = SequenceSpec("horizontal", frame_size=SIZE, context_frames=2, step_size=2, p_left=1.0)
    for i in range(20):
        it = make_item(only_left, digits[0], i)
        assert len(it.futures) == 1 and shift_of(it.target[0], it.context[-1]) == (0.0, -2.0)


def test_moving_mnist_keeps_velocity_and_bounces():
    spec = SequenceSpec("moving-mnist", frame_size=SIZE, context_frames=6, step_size=3)
    span = spec.span

    def fold(u):  # free flight reflected off 0 and span
        m = u % (2 * span)
        return torch.where(m <= span, m, 2 * span - m)

    bounced = 0
    for i in range(80):
        t = draw_track(spec, i)
        pos = torch.cat([t.context, t.futures])
        assert len(t.futures) == 1 and (pos >= 0).all() and (pos <= span).all()
        steps = torch.arange(len(pos))[:, None]
        # one constant velocity in [-3, 3]^2 (not 0) explains the whole track (its sign is ambiguous only when
        # the track starts at a border)
        fits = [v for v in ((a, b) for a in range(-3, 4) for b in range(-3, 4)) if v != (0, 0)
                and torch.equal(fold(pos[0] + steps * torch.tensor(v)), pos)]
        assert fits, (i, pos.tolist())
        bounced += int(not torch.equal(pos[0] + steps * torch.tensor(fits[0]), pos))
    assert bounced > 0


def test_stochastic_moving_mnist_changes_velocity_with_its_probability_and_lists_every_future():
    from diffcli.data.sequences import velocities
    still = SequenceSpec("moving-mnist", frame_size=SIZE, context_frames=4, step_size=2)
    assert all(torch.equal(draw_track(still, i).context, draw_track(replace(still, p_change=0.0), i).context)
               for i in range(5))  # p_change 0 is the constant-velocity set, draw for draw
    spec = replace(still, p_change=0.3)
    changed, kept_prob = 0, []
    for i in range(300):
        t = draw_track(spec, i)
        assert torch.isclose(t.probs.sum(), torch.tensor(1.0)) and (t.probs > 0).all()
        assert len(t.futures) == len(torch.unique(t.futures, dim=0)) and 1 < len(t.futures) <= len(velocities(2))
        pos = torch.cat([t.context, t.futures[t.choice][None]])
        # the last move keeps the previous velocity unless it was redrawn (bounces aside: away from the borders)
        inner = ((pos[-3:] > 2) & (pos[-3:] < spec.span - 2)).all()
        if inner:
            changed += int(not torch.equal(pos[-1] - pos[-2], pos[-2] - pos[-3]))
            kept_prob.append(float(t.probs.max()))
    n = len(kept_prob)
    # redrawn with p = 0.3 and the redraw lands on another of the 24 velocities with 23/24: 0.29 of the moves change
    assert abs(changed / n - 0.3 * 23 / 24) < 3 * (0.29 * 0.71 / n) ** 0.5, (changed, n)
    assert abs(sum(kept_prob) / n - (0.7 + 0.3 / 24)) < 1e-6  # the kept velocity's future has 1 - p + p/M


def test_two_digit_moving_mnist_moves_both_and_knows_its_future():
    from diffcli.data.sequences import tiles_of
    digits = fake_digits()
    spec = SequenceSpec("moving-mnist", frame_size=SIZE, context_frames=3, step_size=2, num_digits=2)
    ctx, nxt = make_dataset(spec, digits[:6])
    it = make_item(spec, tiles_of(digits[:6], 5, 2), 5)  # the last sequence pairs digit 5 with digit 0
    assert torch.equal(it.context, ctx[5]) and torch.equal(it.target, nxt[5])
    assert len(it.futures) == 1 and it.choice == 0 and it.shifts.shape == (1, 2)
    one = make_dataset(replace(spec, num_digits=1), digits[:6])[0]
    assert (ctx.float().sum((-2, -1)) > one.float().sum((-2, -1))).all()  # a second digit's ink in every frame
    m = sequence_metrics(it.futures.float() / 255, it.context[-1].float() / 255, it.futures.float() / 255, it.shifts)
    assert m["modes_found"] == 1 and m["directional_accuracy"] == 1.0 and m["iou"] == 1.0


@pytest.mark.parametrize("kw,message", [
    (dict(directions=0), "directions must be >= 1"),
    (dict(p_change=1.5), "p_change is a probability"),
    (dict(num_digits=3), "num_digits must be 1 or 2"),
    (dict(num_digits=2, p_change=0.5), "every pair of moves"),
    (dict(p_left=1.5), "p_left is a probability"),
    (dict(p_left=-0.1), "p_left is a probability"),
    (dict(step_size=9), "leaves the frame"),
    (dict(directions=40, step_size=2), "collide"),
    (dict(context_frames=0), "context_frames must be >= 1"),
])
def test_bad_specs(kw, message):
    with pytest.raises(DiffcliError, match=message):
        check_spec(SequenceSpec("circle-jumping", frame_size=SIZE, **kw))


# ---------------------------------------------------------------- metrics on hand-made frames

def square(y: int, x: int, size: int = 16, side: int = 4) -> torch.Tensor:
    f = torch.zeros(size, size)
    f[y:y + side, x:x + side] = 1.0
    return f


def test_metrics_on_hand_made_frames():
    c = 6
    shifts = torch.tensor([[0, 4], [4, 0], [0, -4], [-4, 0]])
    futures = torch.stack([square(c + dy, c + dx) for dy, dx in shifts.tolist()])[:, None]
    last = square(c, c)
    samples = torch.stack([futures[0, 0], futures[0, 0], futures[2, 0],
                           torch.zeros(16, 16),                          # nothing drawn: no move
                           (futures[1, 0] + futures[3, 0]) / 2])[:, None]  # two futures averaged: no move
    m = sequence_metrics(samples, last, futures, shifts)
    assert m["modes_possible"] == 4 and m["modes_found"] == 2
    assert m["landed"] == [2, 0, 1, 0]
    assert m["directional_accuracy"] == pytest.approx(3 / 5)
    # L2 (RMSE): 0 for the three exact samples; blank: 16 px of ink missing; average: 32 px off by 0.5
    assert m["l2"] == pytest.approx((0 + 0 + 0 + (16 / 256) ** 0.5 + (32 * 0.25 / 256) ** 0.5) / 5)
    assert m["iou"] == pytest.approx(3 / 5)  # the blank and the half-ink average (0.5 is not > 0.5) miss
    one_px_off = square(c, c + 5)[None, None]
    m1 = sequence_metrics(one_px_off, last, futures, shifts)
    assert m1["directional_accuracy"] == 1.0 and m1["iou"] == pytest.approx(12 / 20)


def test_iou_and_centroid_edge_cases():
    assert float(iou(torch.zeros(4, 4), torch.zeros(4, 4))) == 1.0
    assert centroid(torch.zeros(5, 7)).tolist() == [2.0, 3.0]
    assert centroid(square(2, 3, side=3)).tolist() == [3.0, 4.0]


def test_precond_needs_its_context():
    from diffcli.core.denoisers import EDMPrecond
    net = lambda x, c, y: x[:, :1]
    d = EDMPrecond(net, context_frames=2)
    x = torch.zeros(3, 1, 8, 8)
    assert d(x, torch.ones(3), context=torch.zeros(3, 2, 8, 8)).shape == x.shape
    with pytest.raises(ValueError, match="needs context"):
        d(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"\(3, 2, 8, 8\)"):
        d(x, torch.ones(3), context=torch.zeros(3, 1, 8, 8))


def test_read_context_checks_frames_and_shape(tmp_path):
    torch.save(torch.zeros(3, 16, 16), tmp_path / "c.pt")
    with pytest.raises(DiffcliError, match=r"expects 2 context frame\(s\) of 16x16"):
        read_context(tmp_path / "c.pt", 2, 16)
    torch.save(torch.full((1, 2, 16, 16), 255, dtype=torch.uint8), tmp_path / "u.pt")
    assert torch.equal(read_context(tmp_path / "u.pt", 2, 16), torch.ones(2, 16, 16))


# ---------------------------------------------------------------- the CLI on a tiny next-frame model

def cli(*args):
    """The real Typer app in this process (a subprocess per call costs seconds of imports); training, the one
    long-running command, goes through the entry point in a subprocess below."""
    from typer.testing import CliRunner
    from diffcli.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_ok(*args):
    res = cli(*args)
    assert res.exit_code == 0, (args, res.stderr, res.exception)
    return res


SEQ = ("--dataset", "circle-jumping", "--split", "test", "--image-size", str(SIZE), "--context-frames", "1",
       "--step-size", "4")


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory, mnist_root):
    out = tmp_path_factory.mktemp("seq") / "run"
    call_cli("train", *SEQ, "--data-root", mnist_root, "--net", "tiny", "--batch", "4", "--steps", "3",
            "--lr-warmup", "1", "--grid-every", "3", "--log-every", "0", "--quiet", "--device", "cpu", "--out", out,
            check=True)
    return out


def test_trained_model_records_its_sequences(seq_run, mnist_root):
    from diffcli.backends.models import load_model
    model, meta = load_model(seq_run)
    assert meta["context_frames"] == 1 and meta["net"]["in_channels"] == 2 and meta["num_classes"] == 0
    assert meta["sequence"]["kind"] == "circle-jumping" and meta["sequence"]["directions"] == 4
    assert meta["sequence"]["data_root"] == str(mnist_root.resolve())
    assert (seq_run / "grids" / "step-0000003.png").is_file()


@pytest.fixture
def forbid_mnist(monkeypatch):
    """Any read of MNIST fails the test: contexts must come from the digits the model file carries."""
    from diffcli.data import contexts

    def no_mnist(*args, **kwargs):
        raise AssertionError("MNIST read although the model file carries the digits")
    return lambda: monkeypatch.setattr(contexts, "mnist_digit_tiles", no_mnist)


def test_model_file_carries_its_digits_so_contexts_need_no_mnist(seq_run, mnist_root, tmp_path, forbid_mnist):
    from safetensors import safe_open
    from diffcli.backends.models import load_model
    from diffcli.data.sequences import SEQUENCE_DIGITS
    _, meta = load_model(seq_run)
    with safe_open(str(seq_run / "model.safetensors"), "pt") as f:
        carried = f.get_tensor(SEQUENCE_DIGITS)
    assert carried.dtype == torch.uint8 and meta["sequence"]["digits_carried"] == len(carried) == 20
    with_mnist = tmp_path / "mnist"
    cli_ok("sample", "--checkpoint", seq_run, "--context", "3", "--n", "2", "--steps", "2", "--data-root", mnist_root,
           "--out", with_mnist, "--device", "cpu")
    forbid_mnist()
    carried_out = tmp_path / "carried"
    cli_ok("sample", "--checkpoint", seq_run, "--context", "3", "--n", "2", "--steps", "2", "--out", carried_out,
           "--device", "cpu")
    for f in ("00000-seed0.png", "context.png", "sequence.png"):
        assert pixels(carried_out / f) == pixels(with_mnist / f), f


def test_sample_with_context_index_then_file(seq_run, tmp_path):
    out = tmp_path / "s"
    cli_ok("sample", "--checkpoint", seq_run, "--context", "2", "--n", "3", "--steps", "2", "--out", out,
           "--device", "cpu")
    for f in ("00002-seed2.png", "grid.png", "context.png", "sequence.png", "landing.png"):
        assert (out / f).is_file(), f
    rec = json.loads((out / "run.json").read_text())
    m = rec["sequence"]["metrics"]
    assert rec["sequence"]["contexts"] == ["index 2"] and m["modes_possible"] == 4
    assert {"modes_found", "directional_accuracy", "l2", "iou"} <= set(m)
    # the written context.png is a valid --context FILE and gives the same samples
    again = tmp_path / "f"
    cli_ok("sample", "--checkpoint", seq_run, "--context", out / "context.png", "--n", "3", "--steps", "2",
           "--out", again, "--device", "cpu")
    assert pixels(again / "00001-seed1.png") == pixels(out / "00001-seed1.png")
    assert "metrics" not in json.loads((again / "run.json").read_text())["sequence"]  # a file has no known truth


def test_pg_compare_on_contexts(seq_run, tmp_path):
    out = tmp_path / "pg"
    proc = cli_ok("pg", "--checkpoint", seq_run, "--context", "0:2", "--n", "3", "--steps", "3", "--pg-factor", "3",
                  "--compare", "--out", out, "--device", "cpu")
    for line in ("modes found", "directional accuracy", "L2 to nearest true future", "IoU with nearest true future"):
        assert line in proc.stdout
    cmp = json.loads((out / "compare.json").read_text())
    for part in ("plain", "pg"):
        assert cmp[part]["contexts"] == 2 and cmp[part]["modes_possible"] == 4
    # PG spreads the particles of each context
    assert cmp["pg"]["pairwise_rmse"] > cmp["plain"]["pairwise_rmse"]
    rec = json.loads((out / "run.json").read_text())
    assert [s["context"] for s in rec["samples"]] == ["index 0"] * 3 + ["index 1"] * 3
    assert [s["seed"] for s in rec["samples"]] == list(range(6))
    for f in ("compare.png", "landing-compare.png", "sequence.png", "plain/sequence.png", "00005-seed5.png"):
        assert (out / f).is_file(), f
    import importlib.util
    assert (out / "landing-scatter.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)


@pytest.mark.parametrize("extra", [("--p-change", "0.5"), ("--num-digits", "2")])
def test_preview_of_the_stochastic_and_two_digit_sets(mnist_root, tmp_path, extra):
    out = tmp_path / "prev"
    cli_ok("train", "--dataset", "moving-mnist", "--split", "test", "--image-size", str(SIZE), "--context-frames", "2",
           "--step-size", "1", *extra, "--data-root", mnist_root, "--preview", "2", "--out", out)
    from PIL import Image
    w, _ = Image.open(out / "preview.png").size
    assert (w > 10 * SIZE) == (extra[0] == "--p-change")  # every allowed future shown: 8 velocities, or the one


def test_preview_writes_a_strip(mnist_root, tmp_path):
    out = tmp_path / "prev"
    cli_ok("train", *SEQ, "--data-root", mnist_root, "--preview", "3", "--out", out)
    from PIL import Image
    w, h = Image.open(out / "preview.png").size
    assert h == 2 + 3 * (SIZE + 2)  # one row per sequence
    assert w > 6 * SIZE  # context | next frame | 4 futures


@pytest.mark.parametrize("args,message", [
    (("--p-left", "1.5", "--dataset", "horizontal"), "p_left is a probability and must be in [0, 1]"),
    (("--directions", "0"), "directions must be >= 1"),
    (("--p-left", "0.5"), "'p_left' does not apply to circle-jumping"),
    (("--p-change", "0.5"), "'p_change' does not apply to circle-jumping"),
    (("--p-change", "2", "--dataset", "moving-mnist"), "--p-change: p_change is a probability"),
    (("--num-digits", "3", "--dataset", "moving-mnist"), "--num-digits must be"),
])
def test_bad_train_inputs(mnist_root, tmp_path, args, message):
    out = tmp_path / "never"
    proc = cli("train", *SEQ, *args, "--data-root", mnist_root, "--steps", "1", "--out", out, "--device", "cpu")
    lines = proc.stderr.strip().splitlines()
    assert proc.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_bad_contexts(seq_run, tmp_path):
    from PIL import Image
    Image.fromarray(np.zeros((SIZE, 2 * SIZE), np.uint8)).save(tmp_path / "two.png")
    cases = [("sample", ("--context", tmp_path / "two.png"), f"expects 1 context frame(s) of {SIZE}x{SIZE}"),
             ("pg", ("--context", "999"), "outside the model's dataset (sequences 0..19)"),
             ("sample", (), "pass --context N")]
    for cmd, args, message in cases:
        out = tmp_path / "never"
        proc = cli(cmd, "--checkpoint", seq_run, *args, "--n", "2", "--out", out, "--device", "cpu")
        lines = proc.stderr.strip().splitlines()
        assert proc.exit_code == 2 and len(lines) == 1 and message in lines[0], (cmd, proc.stderr)
        assert not out.exists()


# ---------------------------------------------------------------- the shipped next-frame model

def test_shipped_circle_jumping_model_samples_its_futures_with_no_set_up(tmp_path, forbid_mnist):
    """`--checkpoint circle-jumping` by name, contexts from the digits the file carries (no MNIST anywhere), and
    its particles land on the true futures: the 001 evaluation with zero set-up."""
    from diffcli.backends.models import load_model, model_file
    from diffcli.shared.shipped import SHIPPED_CIRCLE
    forbid_mnist()
    assert model_file("circle-jumping") == SHIPPED_CIRCLE
    _, meta = load_model("circle-jumping")
    assert meta["sequence"]["kind"] == "circle-jumping" and meta["sequence"]["directions"] == 4
    assert meta["sequence"]["digits_carried"] == 1000
    out = tmp_path / "pg"
    cli_ok("pg", "--checkpoint", "circle-jumping", "--context", "0:2", "--n", "8", "--steps", "12", "--kernel",
           "centroid", "--pg-factor", "5", "--compare", "--out", out, "--device", "cpu")
    cmp = json.loads((out / "compare.json").read_text())
    for part in ("plain", "pg"):  # a trained model: its samples are jumps, not noise (a random net scores ~0)
        assert cmp[part]["modes_possible"] == 4 and cmp[part]["directional_accuracy"] >= 0.75, cmp[part]
        assert cmp[part]["iou"] >= 0.6, cmp[part]
    assert cmp["pg"]["modes_found"] >= 3.5  # of 4 futures, 2 contexts
    proc = cli("pg", "--checkpoint", "circle-jumping", "--context", "1000", "--n", "2", "--out", tmp_path / "never",
               "--device", "cpu")
    assert proc.exit_code == 2 and "pass --data-root" in proc.stderr and not (tmp_path / "never").exists()
