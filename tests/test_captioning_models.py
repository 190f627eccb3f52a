"""Captioner backends on tiny random-weight models built here and saved locally.

The captions are gibberish; what is tested is the real loading code (through
``model_path`` and through a Hugging Face cache layout), batching, decoding,
device/precision handling, releasing memory, and WD14's tag post-processing
(which is exact, because the tiny ONNX tagger is built with chosen weights).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from captioning import CaptionOptions, caption_folder, get_captioner
from captioning.errors import CaptionerUnavailable
from trainer.errors import UnsupportedError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["a", "cat", "dog", "painting", "of", "the", "red", "blue", "sky", "tree", "house", "river"]
IMAGE_SIZE = 32


def _images():
    return [
        Image.new("RGB", (40, 30), (220, 30, 30)),
        Image.new("RGB", (24, 48), (30, 30, 220)),
        Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)),
    ]


from tests.captioning_fixtures import offline_hub  # noqa: F401  (autouse: offline, empty HF cache)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    text = dict(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        encoder_hidden_size=32, max_position_embeddings=64,
        bos_token_id=vocab["[DEC]"], pad_token_id=0, sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"],
    )
    vision = dict(hidden_size=32, image_size=IMAGE_SIZE, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = BlipProcessor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer)
    folder = tmp_path_factory.mktemp("tiny-blip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              GPT2Tokenizer)

    vocab = {w: i for i, w in enumerate(["</s>", "<pad>", "<unk>"] + ["Ġ" + w for w in WORDS])}
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="<pad>")
    processor = Blip2Processor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer,
                               num_query_tokens=4)  # adds "<image>" as the next id
    image_token = len(vocab)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, image_size=IMAGE_SIZE, patch_size=8, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=37),
        qformer_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=image_token + 1, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, ffn_dim=37, max_position_embeddings=64, word_embed_proj_dim=32,
                         bos_token_id=0, eos_token_id=0, pad_token_id=1),
        num_query_tokens=4,
        image_token_index=image_token,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-blip2")
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def florence2_dir(tmp_path_factory):
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)

    special = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(special + ["Ġ" + w for w in WORDS])}
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False)
    image_processor.image_seq_length = (IMAGE_SIZE // 4) ** 2 + 1  # 8x8 patches + one pooled token
    text = dict(model_type="bart", vocab_size=len(vocab), max_position_embeddings=128, d_model=16,
                encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
                encoder_attention_heads=1, decoder_attention_heads=1,
                bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    vision = dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                  embed_dim=[16], num_heads=[1], num_groups=[1], window_size=4, projection_dim=16, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(
        Florence2Config(text_config=text, vision_config=vision, image_token_id=vocab["<image>"])
    )
    folder = tmp_path_factory.mktemp("tiny-florence2")
    model.save_pretrained(folder)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


# ---- WD14: an ONNX "tagger" with chosen weights, so the tags are exact ----------------------------

# (name, category, weight on the B, G, R channel means in 0..1, bias). Score = sigmoid(w . mean + b).
WD14_TAGS = [
    ("general", 9, (0, 0, 0), 5.0),  # rating: never written
    ("red_theme", 0, (0, 0, 10), -5.0),  # high only when the *R* channel is high: checks RGB -> BGR
    ("blue_theme", 0, (10, 0, 0), -5.0),
    ("^_^", 0, (0, 0, 0), 3.0),  # kaomoji keeps its underscore; sigmoid(3) = 0.95
    ("long_hair", 0, (0, 0, 0), 2.0),  # 0.88
    ("watermark", 0, (0, 0, 0), 4.0),  # 0.98, excluded in some rows below
    ("medium_tag", 0, (0, 0, 0), 0.0),  # 0.50: between the thresholds used below
    ("hatsune_miku", 4, (0, 0, 0), 1.0),  # character, 0.73: under the default 0.85
]


def _write_wd14(folder, fixed_batch: bool = False, tags=WD14_TAGS):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([t[2] for t in tags], dtype=np.float32).T / 255.0  # (3, T), inputs are 0..255
    bias = np.array([t[3] for t in tags], dtype=np.float32)
    batch = 1 if fixed_batch else "N"
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),
            helper.make_node("MatMul", ["mean", "w"], ["logits"]),
            helper.make_node("Add", ["logits", "b"], ["biased"]),
            helper.make_node("Sigmoid", ["biased"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, IMAGE_SIZE, IMAGE_SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(tags)])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},100" for i, (name, cat, _, _) in enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def wd14_dir(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return _write_wd14(tmp_path_factory.mktemp("tiny-wd14"))


def _cache_copy(model_dir, cache_root, repo_id):
    """Lay ``model_dir`` out the way ``hf download`` leaves it in the cache."""
    repo = cache_root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(model_dir, repo / "snapshots" / "0123abcd")


# ---- transformers backends ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fixture",
    [("blip", "blip_dir"), ("blip2", "blip2_dir"), ("blip", "blip2_dir"), ("florence2", "florence2_dir")],
)
def test_transformers_backend_captions_a_batch(name, fixture, request):
    folder = request.getfixturevalue(fixture)
    captioner = get_captioner(name, model_path=str(folder), max_new_tokens=6, num_beams=2)
    assert not captioner.loaded  # lazy: nothing loaded until the first batch
    captions = captioner.caption(_images())
    assert captioner.loaded
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    for caption in captions:  # special and prompt tokens are decoded away; one line each
        assert not any(tok in caption for tok in ("[SEP]", "[DEC]", "<image>", "</s>", "<s>", "<pad>", "\n"))
        assert len(caption.split()) <= 6
    assert captioner.caption([]) == []
    captioner.close()
    assert not captioner.loaded
    captioner.close()  # idempotent


def test_blip_batching_matches_one_by_one(blip_dir):
    captioner = get_captioner("blip", model_path=str(blip_dir), max_new_tokens=5, num_beams=1)
    images = _images()
    assert captioner.caption(images) == [captioner.caption([img])[0] for img in images]
    captioner.close()


def test_blip2_output_drops_the_prompt(blip2_dir):
    """BLIP-2's language model echoes the query placeholders; they must not reach the caption."""
    captioner = get_captioner("blip2", model_path=str(blip2_dir), max_new_tokens=4, num_beams=1)
    images = _images()[:2]
    captions = captioner.caption(images)
    processor, model = captioner._processor, captioner._model
    inputs = processor(images=images, text=["", ""], return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=4, num_beams=1, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert ids.shape[1] == prompt_len + 4  # the echo this backend has to cut
    expected = processor.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)
    assert captions == [" ".join(t.split()) for t in expected]
    captioner.close()


@pytest.mark.parametrize("task", ["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"])
def test_florence2_tasks(florence2_dir, task):
    captioner = get_captioner("florence2", model_path=str(florence2_dir), task=task, max_new_tokens=4, num_beams=1)
    assert len(captioner.caption(_images()[:2])) == 2
    captioner.close()


@pytest.mark.parametrize("fixture, expected", [
    ("florence2_dir", "florence2"), ("blip_dir", "blip"), ("blip2_dir", "blip2"), ("wd14_dir", "wd14"),
])
def test_auto_recognises_a_model_folder(fixture, expected, request):
    folder = request.getfixturevalue(fixture)
    assert get_captioner("auto", model_path=str(folder)).name == expected


def test_weights_found_in_the_hf_cache(blip_dir, tmp_path):
    _cache_copy(blip_dir, tmp_path / "hf-home" / "hub", "Salesforce/blip-image-captioning-base")
    captioner = get_captioner("blip", max_new_tokens=3, num_beams=1)
    assert captioner.folder.parent.name == "snapshots"
    assert len(captioner.caption(_images()[:1])) == 1
    captioner.close()
    # auto prefers florence2 and blip2, which are absent, so it settles on blip
    assert get_captioner("auto").name == "blip"
    from ui.choices import captioners  # the Dataset tab's list says which are there

    assert ("blip", "blip") in captioners() and ("blip2 (not downloaded)", "blip2") in captioners()


def test_other_hub_id_in_cache_via_model_path(blip_dir, tmp_path):
    _cache_copy(blip_dir, tmp_path / "hf-home" / "hub", "Salesforce/blip-image-captioning-large")
    assert get_captioner("blip", model_path="Salesforce/blip-image-captioning-large").name == "blip"


def test_caption_folder_with_a_model(blip_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, img in enumerate(_images()):
        img.save(data / f"img_{i}.png")
    captioner = get_captioner("blip", model_path=str(blip_dir), max_new_tokens=4, num_beams=1)
    report = caption_folder(data, captioner, CaptionOptions(trigger="zzstyle"), batch_size=2)
    assert report.written == ("img_0.png", "img_1.png", "img_2.png") and report.backend == "blip"
    for i in range(3):
        assert (data / f"img_{i}.txt").read_text(encoding="utf-8").startswith("zzstyle")
    assert captioner.loaded  # the caller's captioner is the caller's to close
    captioner.close()


@pytest.mark.parametrize("name, fixture, expect", [
    ("florence2", "blip_dir", "not Florence-2"),
    ("blip", "florence2_dir", "not BLIP"),
])
def test_wrong_kind_of_model_folder(name, fixture, expect, request):
    with pytest.raises(CaptionerUnavailable, match=expect):
        get_captioner(name, model_path=str(request.getfixturevalue(fixture)))


def test_remote_code_florence_is_refused_with_the_converted_id(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoConfig": "x.y"}}))
    with pytest.raises(CaptionerUnavailable, match="florence-community/Florence-2-base"):
        get_captioner("florence2", model_path=str(tmp_path))


def test_incomplete_model_folder_fails_on_load_with_a_reason(blip_dir, tmp_path):
    shutil.copy(blip_dir / "config.json", tmp_path / "config.json")  # no weights, no processor
    captioner = get_captioner("blip", model_path=str(tmp_path))
    with pytest.raises(CaptionerUnavailable, match="could not load .* incomplete"):
        captioner.caption(_images()[:1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(blip_dir):
    captioner = get_captioner("blip", device="cuda", model_path=str(blip_dir))
    with pytest.raises(UnsupportedError, match="--device cpu"):
        captioner.caption(_images()[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fixture, name", [("blip_dir", "blip"), ("florence2_dir", "florence2")])
def test_half_precision_on_gpu_and_memory_released(fixture, name, request):
    captioner = get_captioner(name, device="cuda", model_path=str(request.getfixturevalue(fixture)), max_new_tokens=4)
    assert len(captioner.caption(_images())) == 3
    assert captioner._model.dtype in (torch.float16, torch.bfloat16)
    captioner.close()
    assert torch.cuda.memory_allocated() == 0


# ---- WD14 -----------------------------------------------------------------------------------------

RED, BLUE = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))


@pytest.mark.parametrize("options, red, blue", [
    ({}, "red theme, watermark, ^_^, long hair, medium tag", "blue theme, watermark, ^_^, long hair, medium tag"),
    ({"threshold": 0.6}, "red theme, watermark, ^_^, long hair", "blue theme, watermark, ^_^, long hair"),
    ({"exclude_tags": ("Watermark", "long hair")}, "red theme, ^_^, medium tag", "blue theme, ^_^, medium tag"),
    ({"character_threshold": 0.7, "threshold": 0.9}, "red theme, watermark, ^_^, hatsune miku",
     "blue theme, watermark, ^_^, hatsune miku"),
])
def test_wd14_tags(wd14_dir, options, red, blue):
    captioner = get_captioner("wd14", model_path=str(wd14_dir), **options)
    assert captioner.caption([RED, BLUE]) == [red, blue]
    captioner.close()
    assert not captioner.loaded


def test_wd14_model_with_fixed_batch_of_one(tmp_path):
    pytest.importorskip("onnxruntime")
    captioner = get_captioner("wd14", model_path=str(_write_wd14(tmp_path, fixed_batch=True)), threshold=0.9)
    red, blue = "red theme, watermark, ^_^", "blue theme, watermark, ^_^"
    assert captioner.caption([RED, BLUE, RED]) == [red, blue, red]


def test_wd14_tag_list_must_match_the_model(wd14_dir, tmp_path):
    shutil.copy(wd14_dir / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "selected_tags.csv").write_text("tag_id,name,category,count\n0,only_one,0,1\n")
    with pytest.raises(CaptionerUnavailable, match="8 scores but selected_tags.csv lists 1"):
        get_captioner("wd14", model_path=str(tmp_path)).caption([RED])


def test_wd14_without_onnxruntime_names_the_package(wd14_dir, monkeypatch):
    import captioning.wd14

    monkeypatch.setattr(captioning.wd14, "onnxruntime_installed", lambda: False)
    with pytest.raises(CaptionerUnavailable, match="pip install onnxruntime==1.32.0"):
        get_captioner("wd14", model_path=str(wd14_dir))


def test_wd14_on_cuda_needs_onnxruntime_gpu(wd14_dir):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(CaptionerUnavailable, match="onnxruntime-gpu"):
        get_captioner("wd14", device="cuda", model_path=str(wd14_dir)).caption([RED])
