#!/usr/bin/env python3
"""herd LAB: write a tiny llama GGUF (random weights, about 0.5 MB) that the real `ollama create` accepts.

    mkgguf.py OUT.gguf

It is no useful model: its weights are seeded random numbers, so the same file comes out every time. It exists so
that the real Ollama binary (lab/build-real-ollama.sh) has a real model to create, list, show and copy.
Needs PyPI's `gguf` (pinned in requirements.txt) and numpy.
"""

import sys

import gguf
import numpy as np

N_VOCAB = 32
N_EMBD = 64
N_FF = 128
N_HEAD = 4
N_LAYER = 2
CONTEXT = 256


def write_tiny_llama(path, name="herd-real-tiny"):
    rng = np.random.default_rng(18)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_block_count(N_LAYER)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(N_VOCAB - 3)]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * N_VOCAB)
    writer.add_token_types([2, 3, 3] + [6] * (N_VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def tensor(tname, *shape):
        writer.add_tensor(tname, rng.standard_normal(shape, dtype=np.float32) * 0.02)

    tensor("token_embd.weight", N_VOCAB, N_EMBD)
    for layer in range(N_LAYER):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{layer}.{part}.weight", N_EMBD, N_EMBD)
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        tensor(f"blk.{layer}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"blk.{layer}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"blk.{layer}.ffn_down.weight", N_EMBD, N_FF)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    tensor("output.weight", N_VOCAB, N_EMBD)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: mkgguf.py OUT.gguf\n")
        sys.exit(2)
    write_tiny_llama(sys.argv[1])
