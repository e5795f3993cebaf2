"""A tiny Llama model for end-to-end tests: random weights, a real (trained) BPE tokenizer.

hidden 128, 2 heads (head_dim 64: vLLM's CPU attention rejects 16), 1 KV head, 2 layers,
vocab 512 (and 5 markup tokens) -> about 0.5 MB; a vLLM CPU engine is ready in ~20 s. Deterministic for a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 512  # what the tokenizer is trained to; the markup below comes on top
EOS = "<|endoftext|>"
# Tokens of the formats vLLM's reasoning and tool parsers read (deepseek_r1's </think>, llama3_json's
# <|python_tag|>, hermes' <tool_call>): the parsers look them up in the vocabulary when they start.
MARKUP = ["<think>", "</think>", "<|python_tag|>", "<tool_call>", "</tool_call>"]
# Tools (a system line naming them), an assistant's tool calls (hermes' form) and tool answers render too.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message.get('tool_calls') %}{% for c in message['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>"
    "{% endfor %}{% else %}{{ message['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = """
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
Once upon a time there was a small model that answered questions about the world.
It knew numbers: one two three four five six seven eight nine ten, 0 1 2 3 4 5 6 7 8 9.
Hello world! How are you today? I am fine, thank you. What is your name? My name is Fleet.
A gateway translates requests into sampling parameters and sends each to the right engine.
Beam search keeps the best few sequences at every step; sampling draws one token at random.
""" * 20


def write_tiny_model(out: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """Write a loadable Hugging Face Llama folder (config, tokenizer, safetensors) into `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.add_tokens(MARKUP)  # plain added tokens: kept in the decoded text, where the parsers look for them
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    vocab = len(fast)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger than the default init (0.02), so the output depends on the whole context and
        # logits spread over a few nats: distinct beams, non-degenerate sampling.
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.5 if "embed" in name else 0.15)
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


if __name__ == "__main__":
    import sys

    print(write_tiny_model(Path(sys.argv[1])))


def write_lora_adapter(base: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A real PEFT LoRA adapter of `base` (its attention's q and v projections), with random non-zero
    weights (PEFT's default leaves B at zero: an adapter that changes nothing) scaled to move greedy
    answers; deterministic for a seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    return out


def write_merged_model(base: Path, adapter: Path, out: Path) -> Path:
    """`adapter` merged into `base`'s weights (PEFT's merge_and_unload), saved as a model of its own
    with `base`'s tokenizer: what the adapter served by vLLM must answer like."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def merge_adapter(base: Path, adapter: Path, out: Path) -> Path:
    """What write_merged_model makes, without PEFT or transformers (a machine with vLLM has neither
    PEFT nor, always, the time to load the model twice): each target weight W of `base`'s one
    safetensors file becomes W + (lora_alpha / r) * B @ A, computed in float32 and stored in W's dtype;
    every other file of `base` is copied."""
    import shutil

    from safetensors.torch import load_file, save_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(base / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        w = weights[target]
        delta = lora[key.replace(".lora_A.", ".lora_B.")].float() @ a.float()
        weights[target] = (w.float() + scale * delta).to(w.dtype)
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out
