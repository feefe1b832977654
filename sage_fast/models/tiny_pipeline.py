"""A randomly initialised, tiny HunyuanVideo-1.5 pipeline folder in the diffusers layout, built
offline: the real classes (Qwen2.5-VL text model, ByT5 encoder, HunyuanVideo-1.5 VAE and
transformer) at toy widths, with small byte-level tokenizers. It exercises every code path of
the `hunyuanvideo15_480p` recipe (loading, prompt encoding, VAE decoding, rewards, training)
without the 30 GB of real weights:

    python -m sage_fast.models.tiny_pipeline /tmp/tiny_hv15   # then
    python -m sage_fast.train --recipe hunyuanvideo15_480p video.pipeline=/tmp/tiny_hv15 \\
        model.checkpoint=/tmp/tiny_hv15 video.reward=clip_score=/tmp/tiny_hv15/clip ...

Also writes `clip/` (a tiny CLIP model for the clip_score reward) and `prompts.txt`.
Numbers it produces mean nothing; shapes, dtypes and plumbing are what it tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

__all__ = ["save_tiny_pipeline", "TINY_TEXT_DIM", "TINY_TEXT_2_DIM", "TINY_LATENT_CHANNELS"]

TINY_TEXT_DIM, TINY_TEXT_2_DIM, TINY_LATENT_CHANNELS = 32, 16, 4

# Qwen2-style chat template: system + user turns, then the assistant header
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

PROMPTS = ["a red ball rolling across a wooden table", "a cat jumping onto a sofa",
           "waves breaking on a rocky shore at sunset", "a person walking a dog in the park"]


def _byte_vocab() -> dict[str, int]:
    """One token per byte, spelled as byte-level BPE spells bytes: printable Latin-1 characters
    stand for themselves, the other bytes for the code points from 256 up, in byte order."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {chars[b]: b for b in range(256)}


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer  # noqa: PLC0415

    vocab = _byte_vocab()
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def _clip_tokenizer():
    from transformers import CLIPTokenizer  # noqa: PLC0415

    vocab = {}
    for c in _byte_vocab():
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline (+ clip/ and prompts.txt) to `folder`; returns it."""
    from diffusers import AutoencoderKLHunyuanVideo15  # noqa: PLC0415
    from transformers import (ByT5Tokenizer, CLIPConfig, CLIPModel, Qwen2_5_VLTextConfig,  # noqa: PLC0415
                              Qwen2_5_VLTextModel, T5Config, T5EncoderModel)

    from .hunyuan_video15 import build_transformer  # noqa: PLC0415

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    qwen = _qwen_tokenizer()
    qwen.save_pretrained(out / "tokenizer")
    text_cfg = Qwen2_5_VLTextConfig(vocab_size=len(qwen), hidden_size=TINY_TEXT_DIM, intermediate_size=64,
                                    num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=2048, bos_token_id=None,
                                    eos_token_id=qwen.convert_tokens_to_ids("<|im_end|>"),
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3]})
    Qwen2_5_VLTextModel(text_cfg).save_pretrained(out / "text_encoder")
    byt5 = ByT5Tokenizer()
    byt5.save_pretrained(out / "tokenizer_2")
    t5_cfg = T5Config(vocab_size=len(byt5), d_model=TINY_TEXT_2_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(t5_cfg).save_pretrained(out / "text_encoder_2")
    vae = AutoencoderKLHunyuanVideo15(latent_channels=TINY_LATENT_CHANNELS, block_out_channels=(8, 8, 16, 16, 16),
                                      layers_per_block=1)
    vae.save_pretrained(out / "vae")
    transformer = build_transformer("tiny", seed=seed, in_channels=2 * TINY_LATENT_CHANNELS + 1,
                                    out_channels=TINY_LATENT_CHANNELS, text_embed_dim=TINY_TEXT_DIM,
                                    text_embed_2_dim=TINY_TEXT_2_DIM)
    transformer.save_pretrained(out / "transformer")
    clip_tok = _clip_tokenizer()
    clip_cfg = CLIPConfig(text_config={"vocab_size": len(clip_tok), "hidden_size": 16,
                                       "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "max_position_embeddings": 77, "bos_token_id": None, "pad_token_id": 1,
                                       "eos_token_id": len(clip_tok) - 1},
                          vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16,
                                         "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
                          projection_dim=8)
    CLIPModel(clip_cfg).save_pretrained(out / "clip")
    clip_tok.save_pretrained(out / "clip")
    (out / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sage_fast.models.tiny_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(save_tiny_pipeline(args.folder, args.seed))


if __name__ == "__main__":
    main()
