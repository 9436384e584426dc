"""Write a small random-weight checkpoint of a family that loads with `from_pretrained`.

No model hub is reachable from our machines, so tests and benchmarks build their
model here: a byte-level BPE tokenizer trained on a fixed corpus (with the family's
special tokens and chat template), then the family's `tiny.write` (`family.TinyCheckpoint`): its real config
class and parameter names, random weights from the seed, a slow image processor
config and a generation config.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

# Qwen2-VL's chat template (images/videos as parts of a content list), Qwen2.5-VL's too.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an image picture photo shows describe what is in of and to on with this that "
    "red green blue yellow black white gray dark light small large big tiny wide tall "
    "cat dog bird car tree house road sky cloud sun water river mountain person people "
    "left right top bottom center corner background foreground color shape line text "
    "one two three four five six seven eight nine ten first second third many few "
    "please answer question compare both images are there how where which who why "
    "yes no maybe very quite some all each other same different between above below"
).split()

# (vision, text) shapes. `small` is realistic enough for benchmarks on a CPU.
SIZES: dict[str, dict] = {
    "tiny": {
        "vocab": 1000,
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, mrope_section=[2, 3, 3], max_position_embeddings=4096),
    },
    "small": {
        "vocab": 4000,
        "vision": dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4, fullatt_block_indexes=[2, 5]),
        "text": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, mrope_section=[4, 6, 6], max_position_embeddings=32768),
    },
    # `small`'s encoder with a language model wide enough that compute, not per-token overheads, sets the
    # decode speed on a CPU (about 110M parameters), for language-engine benchmarks
    "medium": {
        "vocab": 4000,
        "vision": dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4, fullatt_block_indexes=[2, 5]),
        "text": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=4, mrope_section=[8, 12, 12], max_position_embeddings=32768),
    },
}


def _corpus(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(4000)]
    lines += ["".join(chars) for chars in itertools.product("0123456789.,:;!?()", repeat=2)]
    return lines


def _build_tokenizer(vocab: int, seed: int, tiny):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=tiny.eos_token,
        pad_token=tiny.pad_token,
        additional_special_tokens=list(tiny.special_tokens),
        model_max_length=32768,
        model_input_names=["input_ids", "attention_mask"],
        **tiny.tokenizer_extras,
    )
    fast.chat_template = tiny.chat_template
    return fast


def make_tiny_model(out: str | Path, size: str = "tiny", seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """Write a checkpoint of `family` (a model_type) to `out` and return its path. Same seed -> same files."""
    from . import family_class

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    tiny = family_class(family).tiny
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(SIZES[size]["vocab"], seed, tiny)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.special_tokens}
    tiny.write(out, size, seed, ids, vocab_size=(len(tokenizer) + 63) // 64 * 64)
    tokenizer.save_pretrained(out)
    (out / "triton_vlm.json").write_text(json.dumps({"generator": "triton-vlm make-tiny-model", "family": family,
                                                     "size": size, "seed": seed}) + "\n")
    return out


INIT_RANGE = 0.1  # wider random weights than HF's 0.02 (see `save_random`)


def save_random(model_class, config, out: Path, seed: int, generation) -> None:
    """`model_class(config)` with random weights from `seed` (the config should ask for INIT_RANGE) and
    random norm gains too: with HF's defaults a tiny model only repeats one token, and parity on that
    proves little. Saved as safetensors, with `generation` as its generation config."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.5)
    model.generation_config = generation
    model.save_pretrained(out, safe_serialization=True)


def generation_config(ids: dict[str, int], eos=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>"):
    """Greedy by default, ending at any of `eos` (special tokens)."""
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=[ids[t] for t in eos], pad_token_id=ids[pad], do_sample=False)


def ensure_model(model: str | Path | None) -> Path:
    """`model`, or the default model path; the default tiny model is built there if missing."""
    from .. import env

    path = Path(model) if model else env.default_model_path()
    if not (path / "config.json").exists():
        if model:
            raise FileNotFoundError(f"no model at {path} (config.json missing)")
        print(f"building the default tiny model in {path}", flush=True)
        make_tiny_model(path)
    return path
