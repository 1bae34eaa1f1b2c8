"""Distributed training on CPU: DDP and FSDP2 (ModelParallelStrategy, gloo) on 2 processes train the reducer,
decoder and sampler stages exactly as one process does on the same global batches; FSDP2 shards what it should, the
checkpoints hold no VLM weights and load into a single-process stage, runs resume; the multi-node launch scripts are
valid and the torchrun one trains; `vugen export-geneval` on 2 torchrun processes writes one process's bytes.

The distributed runs are subprocesses of ``tests/distributed_fit.py`` (Lightning's launcher re-runs the command
line as rank 1: under pytest it would re-run pytest), one launch per strategy training every stage (each process
pays ~10 s of imports); the single-process reference runs the same code in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests import distributed_fit as fit
from tests.fixtures_bundle import make_decoder_export, make_stage
from tests.test_generate_cli import GENEVAL_LINES, tree
from vugen.cli import main as vugen_main
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage, ReducerStage
from vugen.stages.sampler import SamplerStage
from vugen_adapters.llava import LlavaAdapter

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_fit.py"
MULTINODE = ROOT / "examples" / "multinode"
STAGE_CLASSES = {"reducer": ReducerStage, "decoder": DecoderStage, "sampler": SamplerStage}
# What a checkpoint holds besides the trainable weights.
CHECKPOINT_EXTRAS = {"reducer": {"pca_fitted"}, "decoder": {"pca_fitted"}, "sampler": set()}
# Final weights after 3 SGD steps (lr 0.05, 0.005 for the decoder stage; weights of order 1). The runs differ only in
# float summation order (a batch of 16 reduced inside one matmul vs two halves of 8 averaged by all-reduce): fp32
# rounding, ~1e-7 relative in the gradients, moves the weights by about lr * 1e-7 per step. Measured: 3e-8 for the
# reducer stage, 0.0 for the decoder and sampler stages (their micro-batches are computed identically and halves add
# exactly). 1e-5 leaves margin for other CPUs and BLAS builds, far below real faults (measured at lr 0.05: one wrong
# batch 3e-3, each rank drawing the same noise 0.13).
TOLERANCE = 1e-5
# Environment a launched run must not inherit: a leaked LOCAL_RANK makes Lightning think it was launched already.
LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# The main run of each strategy; the single and DDP runs also resume (cheap), the FSDP2 resume is a run of its own.
MAIN_FLAGS = {"single": ("--resume",), "ddp": ("--resume",), "fsdp": ()}
FSDP_RESUME_FLAGS = ("--stages", "reducer", "sampler", "--resume")


class Run(NamedTuple):
    """A finished run: its output folder and, for a launch, its exit status and stderr."""

    out: Path
    returncode: int = 0
    stderr: str = ""

    def check(self) -> Path:
        assert self.returncode == 0, self.stderr[-4000:]
        return self.out

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        return torch.load(self.check() / name, weights_only=True)

    def rank_report(self, stage: str, rank: int) -> dict:
        return json.loads((self.check() / f"{stage}-rank{rank}.json").read_text())


def launch_env() -> dict[str, str]:
    """This process's environment without distributed launch variables, one thread per process."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    return env | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_llava(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llava"))


@pytest.fixture(scope="module")
def decoder_export(tiny_llava, tmp_path_factory) -> str:
    """The decoder-stage export (random weights, 16 px, 8-dim latents) the sampler stage is built on."""
    return str(make_decoder_export(LlavaAdapter(tiny_llava), tmp_path_factory.mktemp("decoder") / "export"))


@pytest.fixture(scope="module")
def runs(tiny_llava, decoder_export, tmp_path_factory) -> Callable[..., Run]:
    """``runs(strategy, *flags) -> Run``: each distinct run once per module (single: in this process)."""
    done: dict[tuple[str, ...], Run] = {}

    def get(strategy: str, *flags: str) -> Run:
        key = (strategy, *flags)
        if key not in done:
            out = tmp_path_factory.mktemp("-".join(key).replace("--", ""))
            if strategy == "single":
                fit.run("single", out, tiny_llava, resume_too="--resume" in flags, decoder_export=decoder_export)
                done[key] = Run(out)
            else:
                command = [sys.executable, str(SCRIPT), strategy, str(out), tiny_llava, *flags]
                command += ["--decoder-export", decoder_export]
                result = subprocess.run(command, cwd=out, env=launch_env(), capture_output=True, text=True, timeout=300)
                done[key] = Run(out, result.returncode, result.stderr)
        return done[key]

    return get


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].shape == value.shape, name
        torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("script", ["slurm.sbatch", "torchrun.sh"])
def test_launch_scripts_are_valid_bash(script):
    path = MULTINODE / script
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert "vugen fit" in text or "-m vugen.cli fit" in text
    assert "configs/trainer/fsdp.yaml" in text and "--trainer.num_nodes" in text and "--trainer.devices" in text


def test_the_trainer_configs_name_what_the_launchers_override():
    fsdp = yaml.safe_load((ROOT / "configs/trainer/fsdp.yaml").read_text())["trainer"]
    assert fsdp["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert fsdp["strategy"]["init_args"]["tensor_parallel_size"] == 1
    # FSDP over every device: the data-parallel mesh must be the whole world (Lightning's "auto" is num_nodes).
    assert fsdp["strategy"]["init_args"]["data_parallel_size"] == fsdp["devices"] * fsdp["num_nodes"]
    assert fsdp["precision"] == "bf16-mixed"
    slurm = yaml.safe_load((ROOT / "configs/trainer/slurm.yaml").read_text())["trainer"]
    assert set(slurm) == {"plugins"}, "slurm.yaml layers over a strategy config: it must not set the strategy"


# ---------------------------------------------------------------------------------------------------- equivalence
@pytest.mark.slow
@pytest.mark.parametrize("stage", fit.STAGES)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_exactly_as_one_on_the_same_global_batches(runs, strategy, stage):
    single, parallel = runs("single", *MAIN_FLAGS["single"]), runs(strategy, *MAIN_FLAGS[strategy])
    # Same data: per step, rank 0's examples then rank 1's are the single process's global batch (per-example sums).
    reference = single.rank_report(stage, 0)["checksums"]
    ranks = [parallel.rank_report(stage, r)["checksums"] for r in range(fit.WORLD_SIZE)]
    if stage != "reducer":  # the single process accumulates the global batch as micro-batches of the ranks' size
        reference = [reference[k] + reference[k + 1] for k in range(0, len(reference), fit.WORLD_SIZE)]
    assert len(reference) == fit.STEPS
    assert [ranks[0][k] + ranks[1][k] for k in range(fit.STEPS)] == reference
    assert ranks[0][0] != ranks[1][0]
    # Same start, and training moved the weights far beyond the tolerance (else equality would prove nothing).
    start = single.weights(f"{stage}-initial-weights.pt")
    assert_same_weights(parallel.weights(f"{stage}-initial-weights.pt"), start, atol=0)
    final = single.weights(f"{stage}-weights.pt")
    assert max(float((final[k] - start[k]).abs().max()) for k in start) > 1000 * TOLERANCE
    if stage == "sampler":  # every kind of weight trained: LoRA A and B in the LM, and the bridge
        for part in (".lora_A.", ".lora_B.", f"{fit.BRIDGE_PATH}."):
            assert max(float((final[k] - start[k]).abs().max()) for k in start if part in k) > 1000 * TOLERANCE, part
    assert_same_weights(parallel.weights(f"{stage}-weights.pt"), final, atol=TOLERANCE)


# ---------------------------------------------------------------------------------------------------- FSDP2
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reducer", "decoder"])
def test_fsdp2_shards_trainable_weights_and_adapter_blocks_and_configure_model_is_idempotent(runs, stage):
    reports = [runs("fsdp", *MAIN_FLAGS["fsdp"]).rank_report(stage, r) for r in range(fit.WORLD_SIZE)]
    for report in reports:
        assert report["configure_model_twice_same_params"] is True
        sharding = report["sharding"]
        trainable, units, rest = sharding["trainable"], sharding["adapter_units"], sharding["adapter_rest"]
        assert trainable["count"] == trainable["dtensors"] == trainable["dim0_shards_of_2"] > 0
        assert sharding["block_classes"] and sharding["adapter_unit_classes"] == sharding["block_classes"]
        assert units["count"] == units["dtensors"] == units["dim0_shards_of_2"] > 0
        assert rest["count"] > 0 and rest["dtensors"] == 0 and rest["local_numel"] == rest["global_numel"]
    for kind in ("trainable", "adapter_units"):  # each rank holds its half of every sharded tensor
        local = [report["sharding"][kind]["local_numel"] for report in reports]
        assert sum(local) == reports[0]["sharding"][kind]["global_numel"]
        assert max(local) - min(local) <= reports[0]["sharding"][kind]["count"]


@pytest.mark.slow
def test_fsdp2_shards_each_lora_layer_and_the_bridge_as_units_of_their_own(runs):
    reports = [runs("fsdp", *MAIN_FLAGS["fsdp"]).rank_report("sampler", r) for r in range(fit.WORLD_SIZE)]
    for report in reports:
        assert report["configure_model_twice_same_params"] is True
        assert report["configure_model_twice_same_bridge_methods"] is True  # not wrapped a second time
        assert report["bridge_methods_wrapped"] == sorted(fit.BRIDGE_METHODS)
        sharding, units = report["sharding"], set(report["sharding"]["units"])
        lora_units = {f"{layer}.{kind}.default" for layer in report["lora_layers"] for kind in ("lora_A", "lora_B")}
        assert report["lora_layers"] and lora_units <= units
        assert len(report["bridge_modules"]) > 1 and set(report["bridge_modules"]) <= units  # the bridge, children
        # Every trainable weight is sharded: FSDP2 averages the gradients of its own parameters only.
        assert sharding["trainable_plain"] == []
        trainable = sharding["trainable"]
        assert trainable["count"] == trainable["dtensors"] == trainable["dim0_shards_of_2"] > 0
        assert set(sharding["block_classes"]) <= set(sharding["adapter_unit_classes"])  # LoRA: Linear units
        assert sharding["adapter_units"]["count"] == sharding["adapter_units"]["dtensors"] > 0
        assert sharding["adapter_rest"]["count"] > 0 and sharding["adapter_rest"]["dtensors"] == 0
    for kind in ("trainable", "adapter_units"):  # the ranks' shards add up to the whole
        local = [report["sharding"][kind]["local_numel"] for report in reports]
        assert sum(local) == reports[0]["sharding"][kind]["global_numel"] and min(local) > 0


def consolidated_state(run: Run, stage: str, strategy: str, tmp_path: Path) -> Path:
    """The run's checkpoint as one single-process file (FSDP2's folder converted); checks the FSDP2 layout."""
    path = run.check() / f"{stage}.ckpt"
    if strategy == "ddp":
        return path
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # torch's public converter: Lightning's consolidate_checkpoint CLI expects FSDPStrategy's "model" key.
    dcp_to_torch_save(path, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["state_dict"]
    torch.save(torch.load(path / "meta.pt", weights_only=False) | {"state_dict": state}, tmp_path / "single.ckpt")
    return tmp_path / "single.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("stage", fit.STAGES)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_loads_into_a_single_process_stage_without_vlm_weights(runs, strategy, stage, tmp_path):
    run = runs(strategy, *MAIN_FLAGS[strategy])
    path = consolidated_state(run, stage, strategy, tmp_path)
    state = torch.load(path, weights_only=True)["state_dict"]
    # No frozen weight: of the VLM only the sampler's LoRA layers, nor the sampler's frozen reducer and decoder.
    vlm = "latent_sampler.adapter." if stage == "sampler" else "adapter."
    assert not [key for key in state if key.startswith(vlm) and ".lora_A." not in key and ".lora_B." not in key]
    if stage == "sampler":
        assert not [key for key in state if key.startswith(("reducer.", "decoder.", "adapter."))]
        assert sum(key.startswith(f"{fit.BRIDGE_PATH}.") for key in state) > 0
        assert sum(key.startswith(vlm) and ".lora_" in key for key in state) > 0  # the VLM's prefix: not vacuous
    trained = run.weights(f"{stage}-weights.pt")
    assert set(state) == set(trained) | CHECKPOINT_EXTRAS[stage]
    loaded = STAGE_CLASSES[stage].load_from_checkpoint(path)  # adapter (and decoder export) rebuilt from hparams
    assert_same_weights(fit.full_trainable_weights(loaded), trained, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "stage"),
    [
        ("single", "reducer"),
        ("single", "decoder"),
        ("ddp", "reducer"),
        ("ddp", "decoder"),
        ("fsdp", "reducer"),
        ("fsdp", "decoder"),
    ],
)
def test_export_dir_holds_the_trained_weights(runs, strategy, stage):
    run = runs(strategy, *MAIN_FLAGS[strategy])
    assert run.rank_report(stage, 0)["export_error"] is None
    trained, export = run.weights(f"{stage}-weights.pt"), run.out / f"{stage}-export"
    parts = {"reducer": (DimensionReducer, export)}
    if stage == "decoder":
        parts = {"reducer": (DimensionReducer, export / "reducer"), "decoder": (PixelDecoder, export / "decoder")}
        sampling = json.loads((export / "sampling.json").read_text())
        assert sampling == {
            "solver": "heun",
            "steps": 25,
            "guidance_scale": 1.0,
            "guidance_interval": None,
            "time_shift": None,
        }  # DecoderStage's defaults
    for prefix, (cls, folder) in parts.items():
        saved = cls.from_pretrained(folder).state_dict()
        expected = {k.removeprefix(f"{prefix}."): v for k, v in trained.items() if k.startswith(f"{prefix}.")}
        assert_same_weights(saved, expected, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "flags", "stage"),
    [
        ("single", MAIN_FLAGS["single"], "reducer"),
        ("single", MAIN_FLAGS["single"], "decoder"),
        ("single", MAIN_FLAGS["single"], "sampler"),
        ("ddp", MAIN_FLAGS["ddp"], "reducer"),
        ("ddp", MAIN_FLAGS["ddp"], "decoder"),
        ("ddp", MAIN_FLAGS["ddp"], "sampler"),
        ("fsdp", FSDP_RESUME_FLAGS, "reducer"),
        ("fsdp", FSDP_RESUME_FLAGS, "sampler"),
    ],
)
def test_a_run_resumes_from_its_checkpoint(runs, strategy, flags, stage):
    run = runs(strategy, *flags)
    assert json.loads((run.check() / f"{stage}-resumed.json").read_text()) == {"global_step": fit.STEPS + 1}
    restored = run.weights(f"{stage}-restored-weights.pt")
    assert_same_weights(restored, run.weights(f"{stage}-weights.pt"), atol=0)


@pytest.mark.slow
def test_fsdp2_pca_init_is_the_pca_of_rank_zeros_first_batch(runs, tiny_llava):
    run = runs("fsdp", "--stages", "reducer", "--pca-init")
    started = run.weights("reducer-initial-weights.pt")
    reference = fit.build_stage("reducer", tiny_llava, pca_init=True)
    images = fit.training_images()
    first_batch = torch.stack([images[i]["images"] for i in range(fit.RANK_BATCH)])  # rank 0's first batch
    reference.reducer.init_from_pca(reference.encode_features(first_batch))
    assert_same_weights(started, fit.full_trainable_weights(reference), atol=TOLERANCE)


# ---------------------------------------------------------------------------------------------------- torchrun
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_torchrun_example_trains_a_stage_with_fsdp2(tiny_llava, tmp_path):
    """examples/multinode/torchrun.sh as documented (1 node x 2 processes), on CPU in fp32 with a tiny config."""
    config = yaml.safe_load((ROOT / "configs/demo/reducer.yaml").read_text())
    for key in ("val_check_interval", "check_val_every_n_epoch", "logger"):
        config["trainer"].pop(key)
    config["trainer"] |= {"max_steps": 2, "logger": False, "limit_val_batches": 0, "default_root_dir": str(tmp_path)}
    config["model"]["init_args"]["adapter"]["init_args"]["pretrained"] = tiny_llava
    config["model"]["init_args"] |= {"pca_init": False, "export_dir": None}
    config["model"]["init_args"]["reducer"]["init_args"]["hidden_dim"] = 32
    config["data"]["init_args"] |= {"image_size": 16, "train_size": 32, "batch_size": 8}
    (tmp_path / "reducer.yaml").write_text(yaml.safe_dump(config))
    env = launch_env() | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's torchrun
        "CONFIG": str(tmp_path / "reducer.yaml"),
        "NNODES": "1",
        "NPROC_PER_NODE": "2",
        "RDZV_ENDPOINT": f"localhost:{free_port()}",
    }
    overrides = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.enable_progress_bar",
        "false",
    ]
    result = subprocess.run(
        ["bash", str(MULTINODE / "torchrun.sh"), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(checkpoint / "meta.pt", weights_only=False)["global_step"] == 2


# ---------------------------------------------------------------------------------------------------- generation
@pytest.mark.slow
def test_export_geneval_on_two_torchrun_processes_writes_the_bytes_of_one_process(
    tiny_llava, decoder_export, tmp_path, monkeypatch
):
    """`vugen export-geneval` under torchrun: Lightning joins the processes torchrun started (devices and num_nodes
    default to LOCAL_WORLD_SIZE and WORLD_SIZE / LOCAL_WORLD_SIZE) and each predicts its share of the prompts."""
    bundle = make_stage(tiny_llava, decoder_export).pipeline().save_pretrained(tmp_path / "bundle")
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("\n".join(GENEVAL_LINES) + "\n")
    options = ["--n", "2", "--seed", "5"]
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "logs")]
    # "--": else torchrun's parser takes --n for an abbreviation of its own options
    command += ["--redirects", "3", "--no-python", "--", str(bin_dir / "vugen"), "export-geneval"]
    command += [str(bundle), str(metadata), str(tmp_path / "two"), *options]
    launch = subprocess.Popen(command, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the one-process reference meanwhile, through the same CLI in this process
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        vugen_main(["export-geneval", str(bundle), str(metadata), str(tmp_path / "one"), *options])
        output, _ = launch.communicate(timeout=300)
    finally:
        launch.kill()
    assert launch.returncode == 0, output[-4000:]

    one = tree(tmp_path / "one")
    assert len(one) == 1 + 3 * 4  # the sidecar, then per prompt its metadata, 2 samples and the grid
    assert tree(tmp_path / "two") == one
    # One process group of the two torchrun processes (Lightning's line on each rank).
    logs = {rank: "".join(p.read_text() for p in (tmp_path / "logs").rglob(f"{rank}/*.log")) for rank in (0, 1)}
    assert all(f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in logs[rank] for rank in (0, 1)), logs
