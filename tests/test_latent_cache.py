"""Latent cache for stage 2 with the tiny LLaVA: exact latents and captions, shards, the datamodule, stale caches
refused, atomic writes, per-rank parts, and the `cache-latents` command built by jsonargparse, on one process and on
two (rank / world_size given, or RANK / WORLD_SIZE from the environment or torchrun)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from jsonargparse import CLI
from safetensors import safe_open

from tests.helpers import replace_vlm_weights
from tests.test_image_text_data import write_folder, write_shards
from vugen.cli import main as vugen_main
from vugen.commands.cache_latents import cache_latents
from vugen.data.image_text import ImageTextDataModule
from vugen.data.latent_cache import LatentCacheDataModule, LatentCacheDataset
from vugen.data.latent_index import StaleCacheError, check_fingerprint, read_index, reducer_sha256
from vugen.data.latent_writer import write_latent_cache
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.fingerprint import vlm_fingerprint
from vugen.nn import DimensionReducer
from vugen_adapters.llava import LlavaAdapter

SAMPLES, BATCH, LATENT_DIM = 10, 4, 8


def make_data(**kwargs) -> ShapesDataModule:
    return ShapesDataModule(**({"train_size": SAMPLES, "batch_size": BATCH, "seed": 3} | kwargs))


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint) -> LlavaAdapter:
    return LlavaAdapter(str(tiny_checkpoint("llava")))


@pytest.fixture(scope="module")
def reducer(adapter) -> DimensionReducer:
    torch.manual_seed(0)
    # Left in train mode (noise on): the writer must switch the noise off and restore the mode.
    return DimensionReducer(adapter.feature_dim, latent_dim=LATENT_DIM, hidden_dim=16, num_blocks=1).train()


@pytest.fixture(scope="module")
def reference(adapter, reducer) -> tuple[torch.Tensor, list[str]]:
    """Latents and captions of the train split, encoded batch by batch straight from the dataset."""
    dataset = make_data().dataset("train")
    samples = [dataset[i] for i in range(SAMPLES)]
    latents = []
    for start in range(0, SAMPLES, BATCH):
        images = torch.stack([sample["images"] for sample in samples[start : start + BATCH]])
        with torch.no_grad():
            latents.append(reducer.eval().encode(adapter.encode_images(images)))
    reducer.train()
    return torch.cat(latents), [sample["captions"] for sample in samples]


@pytest.fixture(scope="module")
def cache(adapter, reducer, tmp_path_factory):
    return write_latent_cache(make_data(), adapter, reducer, tmp_path_factory.mktemp("c") / "cache", shard_size=3)


def test_cache_holds_the_eval_latents_and_captions_in_order(cache, adapter, reducer, reference):
    latents, captions = reference
    assert reducer.training  # its mode is restored
    assert sorted(p.name for p in cache.iterdir()) == ["index.json"] + [
        f"latents-{i:05d}.safetensors" for i in range(4)
    ]
    index = read_index(cache)
    assert index["num_samples"] == SAMPLES
    assert [(s["file"], s["count"]) for s in index["shards"]] == [
        (f"latents-{i:05d}.safetensors", n) for i, n in enumerate([3, 3, 3, 1])
    ]
    assert (index["token_grid"], index["latent_dim"], index["image_size"], index["dtype"]) == (
        [8, 8],
        LATENT_DIM,
        [32, 32],
        "float32",
    )
    assert index["fingerprint"]["adapter"]["pretrained"] == adapter.pretrained
    assert index["fingerprint"]["adapter"]["feature_source"] == "vision"
    assert index["fingerprint"]["vlm"] == vlm_fingerprint(adapter.pretrained)  # the VLM's contents, not its path
    assert "model.safetensors" in index["fingerprint"]["vlm"]["files"]
    assert index["fingerprint"]["reducer"]["sha256"] == reducer_sha256(reducer)
    assert index["fingerprint"]["reducer"]["config"]["latent_dim"] == LATENT_DIM

    shard_latents, shard_captions = [], []
    for shard in index["shards"]:
        with safe_open(cache / shard["file"], framework="pt") as handle:
            shard_latents.append(handle.get_tensor("latents"))
            shard_captions += json.loads(handle.metadata()["captions"])
    assert [t.shape for t in shard_latents] == [torch.Size([n, 64, LATENT_DIM]) for n in (3, 3, 3, 1)]
    assert torch.equal(torch.cat(shard_latents), latents)
    assert shard_captions == captions

    dataset = LatentCacheDataset(cache)
    assert len(dataset) == SAMPLES
    for i in (0, 4, 9):
        assert torch.equal(dataset[i]["latents"], latents[i]) and dataset[i]["captions"] == captions[i]
    # Spawned DataLoader workers get a pickled copy: the open shards stay behind, the samples do not change.
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[4]["latents"], latents[4]) and clone[4]["captions"] == captions[4]
    with pytest.raises(IndexError, match="sample 10 out of range"):
        dataset[SAMPLES]


def test_datamodule_batches(cache, reference):
    latents, captions = reference
    ordered = LatentCacheDataModule(str(cache), batch_size=BATCH, shuffle=False)
    ordered.setup("fit")
    assert ordered.index["token_grid"] == [8, 8] and ordered.index["latent_dim"] == LATENT_DIM
    batches = list(ordered.train_dataloader())
    assert [b["latents"].shape for b in batches] == [torch.Size([n, 64, LATENT_DIM]) for n in (4, 4, 2)]
    assert torch.equal(torch.cat([b["latents"] for b in batches]), latents)
    assert [c for b in batches for c in b["captions"]] == captions
    assert ordered.val_dataloader() == []

    shuffled = LatentCacheDataModule(str(cache), batch_size=BATCH, seed=7, val_cache_dir=str(cache))
    # Epoch 0's order: the permutation seeded with `seed` + epoch.
    order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(7))
    batches = list(shuffled.train_dataloader())
    assert sorted(order.tolist()) == list(range(SAMPLES)) and order.tolist() != list(range(SAMPLES))
    assert torch.equal(torch.cat([b["latents"] for b in batches]), latents[order])
    assert [c for b in batches for c in b["captions"]] == [captions[i] for i in order]
    assert torch.equal(next(iter(shuffled.val_dataloader()))["latents"], latents[:BATCH])


def test_stored_dtype(adapter, reducer, reference, tmp_path):
    half = write_latent_cache(make_data(), adapter, reducer, tmp_path / "half", dtype=torch.float16, progress=False)
    assert read_index(half)["dtype"] == "float16"
    assert torch.equal(LatentCacheDataset(half)[3]["latents"], reference[0][3].half())


def test_stale_cache_is_refused_naming_what_differs(cache, adapter, reducer, tiny_checkpoint, tmp_path):
    check_fingerprint(cache, adapter, reducer)  # same adapter and reducer: accepted
    LatentCacheDataModule(str(cache)).check_fingerprint(adapter, reducer)

    retrained = copy.deepcopy(reducer)
    with torch.no_grad():
        retrained.in_proj.bias[0] += 1e-3
    with pytest.raises(StaleCacheError, match=r"reducer weights differ: cache sha256 [0-9a-f]{12}\.\. vs current"):
        LatentCacheDataModule(str(cache)).check_fingerprint(adapter, retrained)
    wider = DimensionReducer(adapter.feature_dim, latent_dim=16, hidden_dim=16, num_blocks=1)
    with pytest.raises(StaleCacheError, match="reducer config latent_dim differs: cache 8 vs current 16") as error:
        check_fingerprint(cache, adapter, wider)
    assert "latent_dim differs: cache 8 vs current reducer 16" in str(error.value)

    projector = LlavaAdapter(adapter.pretrained, feature_source="projector")
    with pytest.raises(StaleCacheError, match="adapter feature_source differs: cache 'vision' vs current 'projector'"):
        check_fingerprint(cache, projector, reducer)
    assert issubclass(StaleCacheError, ValueError)


# -------------------------------------------------------------------------------------------------- the VLM's contents
@pytest.fixture
def own_vlm(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny LLaVA that a test may change."""
    return Path(shutil.copytree(tiny_checkpoint("llava"), tmp_path / "project" / "tiny-llava"))


def test_the_same_vlm_at_another_path_is_accepted(own_vlm, reducer, tmp_path):
    cache = write_latent_cache(make_data(), LlavaAdapter(str(own_vlm)), reducer, tmp_path / "cache", progress=False)
    moved = Path(shutil.move(own_vlm.parent, tmp_path / "moved")) / own_vlm.name  # the project folder moved
    check_fingerprint(cache, LlavaAdapter(str(moved)), reducer)
    copy = shutil.copytree(moved, tmp_path / "copy")
    LatentCacheDataModule(str(cache)).check_fingerprint(LlavaAdapter(str(copy)), reducer)


def test_other_weights_at_the_same_path_are_refused(own_vlm, reducer, tmp_path):
    cache = write_latent_cache(make_data(), LlavaAdapter(str(own_vlm)), reducer, tmp_path / "cache", progress=False)
    replace_vlm_weights(own_vlm)
    with pytest.raises(StaleCacheError) as error:
        check_fingerprint(cache, LlavaAdapter(str(own_vlm)), reducer)
    message = str(error.value)
    assert f"adapter VLM differs (cache '{own_vlm}' vs current '{own_vlm}'): model.safetensors changed contents" in (
        message
    )
    assert "\n" not in message and message.endswith("Re-run `vugen cache-latents` with the current ones.")


def test_another_preprocessing_at_the_same_path_is_refused(own_vlm, reducer, tmp_path):
    cache = write_latent_cache(make_data(), LlavaAdapter(str(own_vlm)), reducer, tmp_path / "cache", progress=False)
    config = own_vlm / "processor_config.json"
    config.write_text(config.read_text().replace("0.5", "0.25"))  # same weights, other image normalisation
    with pytest.raises(StaleCacheError, match=r"adapter VLM differs .*: processor_config\.json changed contents\."):
        check_fingerprint(cache, LlavaAdapter(str(own_vlm)), reducer)


def test_a_source_without_contents_falls_back_to_its_name(adapter, reducer, tmp_path, monkeypatch):
    """A custom adapter's ``pretrained`` that is no local path nor a cached Hub snapshot has no content fingerprint:
    the cache then records and compares that value, as it did before content fingerprints."""
    monkeypatch.setattr(adapter, "pretrained", "weights-server:tiny-llava")
    cache = write_latent_cache(make_data(), adapter, reducer, tmp_path / "cache", progress=False)
    fingerprint = read_index(cache)["fingerprint"]
    assert fingerprint["vlm"] is None and fingerprint["adapter"]["pretrained"] == "weights-server:tiny-llava"
    check_fingerprint(cache, adapter, reducer)
    monkeypatch.setattr(adapter, "pretrained", "weights-server:other")
    with pytest.raises(StaleCacheError, match="adapter pretrained differs: cache 'weights-server:tiny-llava' vs"):
        check_fingerprint(cache, adapter, reducer)


def test_a_version_1_cache_is_refused_with_what_to_do(cache, tmp_path):
    old = Path(shutil.copytree(cache, tmp_path / "old"))
    index = json.loads((old / "index.json").read_text())
    del index["fingerprint"]["vlm"]
    (old / "index.json").write_text(json.dumps(index | {"version": 1}))
    with pytest.raises(StaleCacheError, match=r"index\.json: a version-1 latent cache .* re-run `vugen cache-latents`"):
        LatentCacheDataset(old)


def test_interrupted_write_leaves_nothing(adapter, reducer, tmp_path):
    def failing_loader():
        loader = make_data().train_dataloader()
        yield from list(loader)[:2]  # two shards are written before the failure
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_latent_cache(failing_loader(), adapter, reducer, tmp_path / "cache", shard_size=BATCH, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        LatentCacheDataset(tmp_path / "cache")


def test_rank_parts_are_read_as_one_cache(adapter, reducer, reference, tmp_path):
    latents, captions = reference
    out = tmp_path / "cache"
    parts = [
        write_latent_cache(make_data(), adapter, reducer, out, shard_size=3, rank=rank, world_size=2, progress=False)
        for rank in (0, 1)
    ]
    assert parts == [out / "rank-0", out / "rank-1"]
    assert sorted(p.name for p in parts[1].iterdir()) == [
        "index.json",
        "latents-r1-00000.safetensors",
        "latents-r1-00001.safetensors",
    ]
    dataset = LatentCacheDataset(out)
    order = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]  # rank r encodes every second sample from r, rank 0's part first
    assert len(dataset) == SAMPLES and [dataset[i]["captions"] for i in range(SAMPLES)] == [captions[i] for i in order]
    # Other batch compositions than the reference's: equal up to float rounding.
    torch.testing.assert_close(torch.stack([dataset[i]["latents"] for i in range(SAMPLES)]), latents[order])

    retrained = copy.deepcopy(reducer)
    with torch.no_grad():
        retrained.in_proj.bias[0] += 1e-3
    write_latent_cache(make_data(), adapter, retrained, out, rank=1, world_size=2, progress=False)
    with pytest.raises(ValueError, match=r"rank-1 disagrees with rank-0 on \['fingerprint'\]"):
        LatentCacheDataset(out)
    shutil.rmtree(parts[1])
    with pytest.raises(ValueError, match=r"rank parts \[1\] of 2 are missing"):
        LatentCacheDataset(out)


def test_bad_input_is_named(cache, adapter, reducer, tmp_path):
    with pytest.raises(ValueError, match="holds a single-process latent cache"):
        write_latent_cache(make_data(), adapter, reducer, cache, rank=1, world_size=2)
    other_vlm = DimensionReducer(adapter.feature_dim * 2, latent_dim=LATENT_DIM, hidden_dim=16)
    with pytest.raises(ValueError, match="reducer feature_dim 64 != adapter feature_dim 32"):
        write_latent_cache(make_data(), adapter, other_vlm, tmp_path / "a", progress=False)
    mixed = [next(iter(make_data(image_size=size).train_dataloader())) for size in (32, 48)]
    with pytest.raises(ValueError, match=r"batch 1 has \[48, 48\] images, the first had \[32, 32\]"):
        write_latent_cache(mixed, adapter, reducer, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="expected 'captions' as a list of 4 strings"):
        write_latent_cache([{"images": mixed[0]["images"]}], adapter, reducer, tmp_path / "c", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cache_latents_command(adapter, reducer, reference, tmp_path):
    reducer.save_pretrained(tmp_path / "reducer")
    args = ["--adapter.class_path", "vugen_adapters.llava.LlavaAdapter", "--adapter.init_args.pretrained"]
    args += [adapter.pretrained, "--reducer_path", str(tmp_path / "reducer"), "--out_dir", str(tmp_path / "cache")]
    args += ["--data.class_path", "vugen.data.shapes_datamodule.ShapesDataModule", "--data.init_args.seed", "3"]
    args += ["--data.init_args.train_size", str(SAMPLES), "--data.init_args.batch_size", "8", "--batch_size", "4"]
    out = CLI(cache_latents, args=args)
    assert out == tmp_path / "cache"
    check_fingerprint(out, adapter, reducer)  # the reducer reloaded from disk has the same weights hash
    dataset = LatentCacheDataset(out)
    assert torch.equal(torch.stack([dataset[i]["latents"] for i in range(SAMPLES)]), reference[0])


def empty_caption_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "empty captions" in str(w.message)]


def test_empty_captions_are_cached_as_they_are_and_counted_in_a_warning(adapter, reducer, tmp_path):
    images = next(iter(make_data().train_dataloader()))["images"]
    captions = ["a red circle", "", " \t", "a blue square", "", "a green triangle"]
    batches = [{"images": images, "captions": captions[:4]}, {"images": images[:2], "captions": captions[4:]}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_latent_cache(batches, adapter, reducer, tmp_path / "cache", progress=False)
        write_latent_cache(make_data(), adapter, reducer, tmp_path / "captioned", progress=False)
    assert empty_caption_warnings(caught) == [
        f"{out}: 3 of 6 cached samples have empty captions; SamplerStage trains them unconditioned and refuses a "
        "first batch of only empty captions (unless allow_empty_captions). If unintended, check the data's caption "
        "key (caption_key) and captions"
    ]
    assert [caption for caption, _ in samples(out)] == captions


def test_cache_latents_reports_a_folder_without_captions(adapter, reducer_dir, tmp_path):
    root = write_folder(tmp_path / "images", 5, metadata=None)  # every caption ""
    args = command_args(adapter, reducer_dir, tmp_path / "cache")[:8]  # adapter, reducer, out_dir
    args += ["--data.class_path", "vugen.data.image_text.ImageTextDataModule", "--data.init_args.root", str(root)]
    args += ["--data.init_args.image_size", "32", "--data.init_args.num_workers", "0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CLI(cache_latents, args=args)
    assert [message.split(";")[0] for message in empty_caption_warnings(caught)] == [
        f"{tmp_path / 'cache'}: 5 of 5 cached samples have empty captions"
    ]


# ---------------------------------------------------------------------------------------------------- several ranks
def samples(cache_dir: Path) -> list[tuple[str, bytes]]:
    """(caption, latent bytes) of every sample the reader serves, in its order."""
    dataset = LatentCacheDataset(cache_dir)
    return [(dataset[i]["captions"], dataset[i]["latents"].numpy().tobytes()) for i in range(len(dataset))]


def contents(cache_dir: Path) -> Counter:
    """A cache's samples as a multiset of (caption, latent bytes), whatever the order of its parts."""
    return Counter(samples(cache_dir))


def command_args(adapter, reducer_dir: Path, out: Path) -> list[str]:
    """`vugen cache-latents` options for the Shapes train split, one image per encoder batch: a sample's latents
    then do not depend on which samples share its batch, so caches written by any number of ranks agree bitwise."""
    args = ["--adapter.class_path", "vugen_adapters.llava.LlavaAdapter", "--adapter.init_args.pretrained"]
    args += [adapter.pretrained, "--reducer_path", str(reducer_dir), "--out_dir", str(out), "--shard_size", "2"]
    args += ["--data.class_path", "vugen.data.shapes_datamodule.ShapesDataModule", "--data.init_args.seed", "3"]
    return args + ["--data.init_args.train_size", str(SAMPLES), "--data.init_args.batch_size", "4", "--batch_size", "1"]


@pytest.fixture
def reducer_dir(reducer, tmp_path) -> Path:
    reducer.save_pretrained(tmp_path / "reducer")
    return tmp_path / "reducer"


def test_cache_latents_ranks_write_parts_whose_union_is_the_single_cache(adapter, reducer_dir, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = CLI(cache_latents, args=command_args(adapter, reducer_dir, tmp_path / "one"))
    assert single == tmp_path / "one" and read_index(single)["world_size"] == 1
    out = tmp_path / "two"
    part0 = CLI(cache_latents, args=[*command_args(adapter, reducer_dir, out), "--rank", "0", "--world_size", "2"])
    monkeypatch.setenv("RANK", "1")  # rank / world_size left out: torchrun's environment decides
    monkeypatch.setenv("WORLD_SIZE", "2")
    part1 = CLI(cache_latents, args=command_args(adapter, reducer_dir, out))
    assert (part0, part1) == (out / "rank-0", out / "rank-1")
    assert sorted(p.name for p in out.iterdir()) == ["rank-0", "rank-1"]
    assert [read_index(part)["num_samples"] for part in (part0, part1)] == [5, 5]
    assert sorted(p.name for p in part1.iterdir()) == ["index.json"] + [
        f"latents-r1-{i:05d}.safetensors" for i in range(3)
    ]
    union, reference = contents(out), contents(single)
    assert sum(union.values()) == SAMPLES and union == reference  # every sample exactly once, the same bytes
    one = samples(single)
    assert samples(out) == [one[i] for i in [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]]  # rank 0's every second sample first
    loader = LatentCacheDataModule(str(out), batch_size=4, shuffle=False).train_dataloader()
    assert sum(len(batch["captions"]) for batch in loader) == SAMPLES


def test_sharded_data_is_split_by_the_environment_rank_and_must_match_the_given_rank(
    adapter, reducer, tmp_path, monkeypatch
):
    """ImageTextShards splits its shards by RANK / WORLD_SIZE itself: the parts of two ranks hold every sample once,
    and a rank passed alone (with no environment to match) is refused rather than caching every shard twice."""
    pattern = write_shards(tmp_path, num_shards=2, per_shard=3)
    options = {"shards": pattern, "image_size": 32, "batch_size": 1, "num_workers": 0, "shuffle_buffer": 0}
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    single = write_latent_cache(ImageTextDataModule(**options), adapter, reducer, tmp_path / "one", progress=False)
    with pytest.raises(ValueError, match="reads the share of rank 0 of 1 .*not of rank 1 of 2: launch one process"):
        write_latent_cache(ImageTextDataModule(**options), adapter, reducer, tmp_path / "x", rank=1, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        write_latent_cache(
            ImageTextDataModule(**options), adapter, reducer, tmp_path / "two", rank=rank, world_size=2, progress=False
        )
    with pytest.raises(ValueError, match="reads the share of rank 1 of 2 .*not of rank 0 of 1"):
        write_latent_cache(ImageTextDataModule(**options), adapter, reducer, tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert [read_index(tmp_path / "two" / f"rank-{r}")["num_samples"] for r in (0, 1)] == [3, 3]
    assert sum(contents(single).values()) == 6 and contents(tmp_path / "two") == contents(single)


def test_cache_latents_on_two_torchrun_processes_writes_the_single_process_cache(
    adapter, reducer_dir, tmp_path, monkeypatch
):
    """`torchrun --nproc_per_node 2 -- vugen cache-latents`: each process writes its rank's part (RANK / WORLD_SIZE
    from torchrun, on the CPU here); read together they are the one-process cache."""
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", "--"]
    command += [str(bin_dir / "vugen"), "cache-latents", *command_args(adapter, reducer_dir, tmp_path / "two")]
    launched = {"LOCAL_RANK", "RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {key: value for key, value in os.environ.items() if key not in launched} | {"OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the one-process reference meanwhile, through the same CLI in this process
        for name in launched:
            monkeypatch.delenv(name, raising=False)
        vugen_main(["cache-latents", *command_args(adapter, reducer_dir, tmp_path / "one")])
        output, _ = launch.communicate(timeout=300)
    finally:
        launch.kill()
    assert launch.returncode == 0, output[-4000:]
    two = tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == ["rank-0", "rank-1"]
    index = read_index(two)
    assert (index["world_size"], index["num_samples"]) == (2, SAMPLES)
    assert contents(two) == contents(tmp_path / "one")
    datamodule = LatentCacheDataModule(str(two), batch_size=4, shuffle=False)
    datamodule.setup("fit")
    assert datamodule.index["fingerprint"] == read_index(tmp_path / "one")["fingerprint"]


def test_cache_latents_names_a_mistyped_reducer_folder_at_once(adapter, tmp_path, monkeypatch, capsys):
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # not a Hub id to wait for on the network
        vugen_main(["cache-latents", *command_args(adapter, Path("outputs/no-such-reducer"), tmp_path / "cache")])
    assert exit_info.value.code == 1
    assert "--reducer_path" in capsys.readouterr().err and not (tmp_path / "cache").exists()
