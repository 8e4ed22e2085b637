"""train.optimizer=muon: Muon for the blocks' matrices, AdamW for the rest; exact resume; 2 processes = 1."""

import math

import pytest
import torch
import yaml

from smollm2 import muon
from smollm2.checkpoint import load_checkpoint
from smollm2.config import load_config
from smollm2.model import SmolLM2
from smollm2.muon import GatheringMuon, hidden_matrices
from smollm2.trainer import make_optimizer, train
from tests.conftest import small_config
from tests.helpers import losses, metrics, one_error_line, run_train
from tests.helpers import run_distributed as run

MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] + [
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
CPU = torch.device("cpu")


def names_by_optimizer(model: SmolLM2, optimizer) -> tuple[list[str], list[str]]:
    names = {id(p): name for name, p in model.named_parameters()}
    muon, adamw = optimizer.optimizers
    return [names[id(p)] for g in muon.param_groups for p in g["params"]], sorted(
        names[id(p)] for g in adamw.param_groups for p in g["params"]
    )


@pytest.mark.parametrize("tied", [True, False])
def test_the_blocks_matrices_go_to_muon_and_the_rest_to_adamw(tied):
    model = SmolLM2(small_config(tie_embeddings=tied))
    settings = load_config("config/tiny.yaml", ["train.optimizer=muon"]).train
    muon, adamw = names_by_optimizer(model, make_optimizer(model, settings, CPU))
    assert muon == [f"layers.{i}.{m}.weight" for i in range(2) for m in MATRICES]
    norms = [f"layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    expected = ["embed_tokens.weight", *norms, "norm.weight"] + ([] if tied else ["lm_head.weight"])
    assert adamw == sorted(expected)


def test_the_135m_presets_split():
    config = load_config("config/smollm2-135m.yaml", ["train.optimizer=muon"])
    with torch.device("meta"):
        model = SmolLM2(config.model)
    muon, adamw = names_by_optimizer(model, make_optimizer(model, config.train, CPU))
    assert muon == [f"layers.{i}.{m}.weight" for i in range(30) for m in MATRICES]
    assert len(adamw) == 1 + 2 * 30 + 1  # embedding (tied head), two norms a block, the final norm
    shapes = {tuple(p.shape) for _, p in hidden_matrices(model)}
    assert shapes == {(576, 576), (192, 576), (1536, 576), (576, 1536)}


def test_the_groups_keep_their_own_learning_rates_and_weight_decay():
    model = SmolLM2(small_config(tie_embeddings=False))
    overrides = ["train.optimizer=muon", "train.lr=2e-3", "train.muon_lr=5e-3", "train.muon_weight_decay=0.05"]
    settings = load_config("config/tiny.yaml", overrides).train
    groups = make_optimizer(model, settings, CPU).param_groups
    assert [(g["lr_ratio"], g["weight_decay"]) for g in groups] == [(2.5, 0.05), (1.0, 0.1), (1.0, 0.0)]
    assert groups[0]["adjust_lr_fn"] == "match_rms_adamw" and groups[0]["momentum"] == 0.95


def test_the_update_is_torchs_muon_bit_for_bit():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(48, 32))
    theirs.data.copy_(ours.data)
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    a, b = GatheringMuon([ours], **settings), torch.optim.Muon([theirs], **settings)
    for _ in range(3):
        grad = torch.randn(48, 32)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(a.state[ours]["momentum_buffer"], b.state[theirs]["momentum_buffer"])


def test_the_optimizer_state_round_trips_as_one_state_dict():
    model = SmolLM2(small_config())
    settings = load_config("config/tiny.yaml", ["train.optimizer=muon"]).train
    optimizer = make_optimizer(model, settings, CPU)
    model(torch.randint(0, 97, (2, 16)), targets=torch.randint(0, 97, (2, 16))).backward()
    optimizer.step()
    state = optimizer.state_dict()
    n = sum(1 for _ in model.parameters())
    assert sorted(state["state"]) == list(range(n))  # numbered as one optimizer numbers its parameters
    assert sorted(i for g in state["param_groups"] for i in g["params"]) == list(range(n))
    again = make_optimizer(model, settings, CPU)
    again.load_state_dict(state)
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(again.state[p][key], value), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_muon_run_resumes_bitwise(run_dir, precision, capsys):
    overrides = ["train.optimizer=muon", "train.schedule_steps=12", f"train.precision={precision}"]
    config = load_config("config/tiny.yaml", overrides)
    train(config, 12, None, "full")
    assert "Muon (lr 0.004) for the blocks' matrices, AdamW (lr 0.003) for the rest" in capsys.readouterr().out
    train(config, 6, None, "split")
    train(config, 6, "split/checkpoints/step_6.pt", "split")
    full, split = metrics(run_dir / "full"), metrics(run_dir / "split")
    assert [r["loss"] for r in split] == [r["loss"] for r in full]
    a = load_checkpoint(run_dir / "full/checkpoints/step_12.pt")
    b = load_checkpoint(run_dir / "split/checkpoints/step_12.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    buffers = [s["momentum_buffer"] for s in a["optimizer"]["state"].values() if "momentum_buffer" in s]
    assert len(buffers) == 2 * 7  # one per hidden matrix of tiny_config's 2 blocks


def weights_at_6(run_folder) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_folder / "checkpoints/step_6.pt")["model"]


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The Frobenius norm of the difference of two models' weights, all tensors together."""
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def test_two_muon_processes_match_one_with_the_same_global_batch(ddp_folder):
    muon, steps = "train.optimizer=muon", ["--train_steps", "6"]
    run(ddp_folder, *steps, "--out_dir", "one", "--set", muon, "train.batch_size=4")
    # The same windows in one process, summed in another order (4 micro-batches of 2, not 2 of 4).
    run(ddp_folder, *steps, "--out_dir", "accum", "--set", muon, "train.batch_size=2", "train.grad_accum=4")
    for parallel in ("ddp", "fsdp"):
        run(ddp_folder, *steps, "--out_dir", parallel, "--set", muon, f"train.parallel={parallel}", processes=2)
    one = weights_at_6(ddp_folder / "one")
    # Newton-Schulz sends a matrix's small singular directions towards 1 (a gain of up to ~480 over
    # 5 steps, in bf16), so gradients that differ only in summation order (1e-7 relative) end in
    # weights a few percent of their movement apart. That is the optimizer's own spread, measured
    # here by `accum`; 2 processes must stay within twice it (measured: 1.3x). Orthogonalizing each
    # rank's shard instead of the whole matrix lands ~70x further off.
    noise = distance(weights_at_6(ddp_folder / "accum"), one)
    assert 0 < noise < 1e-2
    for parallel in ("ddp", "fsdp"):
        assert distance(weights_at_6(ddp_folder / parallel), one) <= 2 * noise, parallel
        for a, b in zip(losses(ddp_folder / parallel), losses(ddp_folder / "one"), strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    # DDP and FSDP2 average the same two gradients, then orthogonalize whole matrices: near-equal.
    assert distance(weights_at_6(ddp_folder / "ddp"), weights_at_6(ddp_folder / "fsdp")) < noise / 10


def test_bad_optimizer_settings_are_one_line(run_dir):
    cfg = ["--config", "config/tiny.yaml", "--train_steps", "2"]
    cases = {
        "train.optimizer=sgd": "train.optimizer in config/tiny.yaml (with --set): 'sgd' is not one of adamw, muon",
        "train.muon_lr=0": "train.muon_lr in config/tiny.yaml (with --set): must be positive, got 0.0",
        "train.muon_momentum=1.5": "train.muon_momentum in config/tiny.yaml (with --set): must be in [0, 1), got 1.5",
        "train.muon_weight_decay=-1": "train.muon_weight_decay in config/tiny.yaml (with --set): must not be negative",
    }
    for setting, message in cases.items():
        line = one_error_line(run_train(*cfg, "--set", setting, cwd=run_dir))
        assert message in line, (setting, line)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "logs").exists()


def test_a_resume_with_the_other_optimizer_is_refused_and_changes_nothing(run_dir):
    train(load_config("config/tiny.yaml"), 2, None, ".")
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    args = ["--config", "config/tiny.yaml", "--train_steps", "2", "--checkpoint_path", "checkpoints/step_2.pt"]
    line = one_error_line(run_train(*args, "--set", "train.optimizer=muon", cwd=run_dir))
    assert line.endswith(
        "checkpoint was trained with train.optimizer=adamw but config/tiny.yaml says muon: its "
        "optimizer state is another optimizer's (to switch, start a new run from its weights with model.init_from)"
    )
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_muon_keys_load_from_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"optimizer": "muon", "muon_lr": "1e-2", "muon_momentum": 0.9}}))
    settings = load_config(path).train
    assert (settings.optimizer, settings.muon_lr, settings.muon_momentum) == ("muon", 0.01, 0.9)


def test_newton_schulz_runs_in_the_runs_matmul_precision_and_leaves_its_input_alone():
    model = SmolLM2(small_config())
    settings = load_config("config/tiny.yaml", ["train.optimizer=muon"]).train
    assert next(muon.parts(make_optimizer(model, settings, CPU))).ns_dtype == torch.float32
    bf16 = make_optimizer(model, settings, CPU, torch.bfloat16)
    assert next(muon.parts(bf16)).ns_dtype == torch.bfloat16
    torch.manual_seed(0)
    momentum = torch.randn(48, 32)
    kept = momentum.clone()
    fp32 = muon.newton_schulz(momentum, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
    assert torch.equal(momentum, kept)
    assert fp32.dtype == torch.float32 and fp32.shape == (48, 32)
    singular = torch.linalg.svdvals(fp32)
    assert 0.6 < singular.min() and singular.max() < 1.25  # orthogonalized, as the quintic leaves it
    in_bf16 = muon.newton_schulz(momentum, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.bfloat16)
    assert (fp32 - in_bf16.float()).abs().max() < 0.05
