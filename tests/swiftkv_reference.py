"""An independent PyTorch SwiftKV reference, written from the formulas of SWIFTKV.md on top of
transformers' Llama (or Qwen2: q/k/v and SwiftKV projections with biases) modules. It runs every layer for every token (no cache, no skipping), so it
shares nothing with our prefill-skipping JAX path except the formulas.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb, repeat_kv


class SwiftKVReference(torch.nn.Module):
    """A transformers LlamaForCausalLM plus SwiftKV weights: norm_swiftkv, q_proj_swiftkv for every
    layer >= L, k/v_proj_swiftkv for group leaders. Random, not the initialisation rules, so a
    mistake in which weight feeds which layer cannot hide."""

    def __init__(self, base, num_key_value_layers: int, group_size: int, seed: int = 0):
        super().__init__()
        self.base, self.L, self.g = base, num_key_value_layers, group_size
        cfg = base.config
        n, d = cfg.num_hidden_layers, cfg.hidden_size
        hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
        gen = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=gen) * cfg.initializer_range
        self.norm_swiftkv = LlamaRMSNorm(d, eps=cfg.rms_norm_eps)
        with torch.no_grad():
            self.norm_swiftkv.weight.copy_(1 + 0.2 * torch.randn(d, generator=gen))
        self.q_swift = {l: rand(cfg.num_attention_heads * hd, d) for l in range(self.L, n)}
        self.k_swift = {l: rand(cfg.num_key_value_heads * hd, d) for l in range(self.L, n, group_size)}
        self.v_swift = {l: rand(cfg.num_key_value_heads * hd, d) for l in range(self.L, n, group_size)}
        self.head_dim = hd
        # Qwen2 (ArcticTraining's Qwen2SwiftKV): every SwiftKV projection has a bias.
        self.biased = base.model.layers[0].self_attn.q_proj.bias is not None
        bias = (lambda size: torch.randn(size, generator=gen) * 0.3) if self.biased else (lambda size: None)
        self.q_swift_bias = {l: bias(cfg.num_attention_heads * hd) for l in self.q_swift}
        self.k_swift_bias = {l: bias(cfg.num_key_value_heads * hd) for l in self.k_swift}
        self.v_swift_bias = {l: bias(cfg.num_key_value_heads * hd) for l in self.k_swift}

    def leader(self, layer: int) -> int:
        return self.L + self.g * ((layer - self.L) // self.g)

    def _attention(self, layer, x, kv_input, q, k, v, cos, sin):
        """q, k, v: (weight, bias or None) of each projection."""
        attn, (b, t, _) = layer.self_attn, x.shape
        cfg, hd = self.base.config, self.head_dim
        linear = lambda inp, wb: torch.nn.functional.linear(inp, *wb).view(b, t, -1, hd).transpose(1, 2)
        q, k, v = linear(x, q), linear(kv_input, k), linear(kv_input, v)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = q @ k.transpose(2, 3) / hd**0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return attn.o_proj((probs @ v).transpose(1, 2).reshape(b, t, -1))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.base.model
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, torch.arange(ids.shape[1])[None])
        s = None
        for l, layer in enumerate(m.layers):
            x = layer.input_layernorm(h)
            a = layer.self_attn
            if l < self.L:
                own = [(p.weight, p.bias) for p in (a.q_proj, a.k_proj, a.v_proj)]
                out = self._attention(layer, x, x, *own, cos, sin)
            else:
                if s is None:
                    s = self.norm_swiftkv(h)  # h is h_L, the input of layer L
                j = self.leader(l)
                out = self._attention(layer, x, s, (self.q_swift[l], self.q_swift_bias[l]),
                                      (self.k_swift[j], self.k_swift_bias[j]),
                                      (self.v_swift[j], self.v_swift_bias[j]), cos, sin)
            h = h + out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.base.lm_head(m.norm(h))

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        for _ in range(n):
            seq.append(int(self(torch.tensor([seq]))[0, -1].argmax()))
        return seq[len(ids):]

    def load_swiftkv_tensors(self, path: Path) -> "SwiftKVReference":
        """Its SwiftKV weights replaced by those of a safetensors file in Hugging Face names (read
        with safetensors' own loader, e.g. a shipped model's float16 tensors)."""
        stored = {k: v.float() for k, v in load_file(str(path)).items()}
        with torch.no_grad():
            self.norm_swiftkv.weight.copy_(stored["model.norm_swiftkv.weight"])
        for l in self.q_swift:
            self.q_swift[l] = stored[f"model.layers.{l}.self_attn.q_proj_swiftkv.weight"]
        for l in self.k_swift:
            self.k_swift[l] = stored[f"model.layers.{l}.self_attn.k_proj_swiftkv.weight"]
            self.v_swift[l] = stored[f"model.layers.{l}.self_attn.v_proj_swiftkv.weight"]
        if self.biased:
            for l in self.q_swift:
                self.q_swift_bias[l] = stored[f"model.layers.{l}.self_attn.q_proj_swiftkv.bias"]
            for l in self.k_swift:
                self.k_swift_bias[l] = stored[f"model.layers.{l}.self_attn.k_proj_swiftkv.bias"]
                self.v_swift_bias[l] = stored[f"model.layers.{l}.self_attn.v_proj_swiftkv.bias"]
        return self

    def save_llama_swiftkv(self, folder: Path, with_original_qkv: bool = True) -> None:
        """Writes a Snowflake-format llama_swiftkv (or qwen2_swiftkv) folder: config fields +
        *_swiftkv tensors."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.base.state_dict().items()}
        if self.base.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        for l in range(self.L, self.base.config.num_hidden_layers):
            prefix = f"model.layers.{l}.self_attn."
            tensors[prefix + "q_proj_swiftkv.weight"] = self.q_swift[l].contiguous()
            if l in self.k_swift:
                tensors[prefix + "k_proj_swiftkv.weight"] = self.k_swift[l].contiguous()
                tensors[prefix + "v_proj_swiftkv.weight"] = self.v_swift[l].contiguous()
            if self.biased:
                tensors[prefix + "q_proj_swiftkv.bias"] = self.q_swift_bias[l].contiguous()
                if l in self.k_swift:
                    tensors[prefix + "k_proj_swiftkv.bias"] = self.k_swift_bias[l].contiguous()
                    tensors[prefix + "v_proj_swiftkv.bias"] = self.v_swift_bias[l].contiguous()
            if not with_original_qkv:
                for p in ("q_proj", "k_proj", "v_proj"):
                    for part in ("weight", "bias"):
                        tensors.pop(f"{prefix}{p}.{part}", None)
        tensors["model.norm_swiftkv.weight"] = self.norm_swiftkv.weight.detach().clone()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = self.base.config.to_dict()
        family = cfg["model_type"]
        arch = {"llama": "LlamaSwiftKVForCausalLM", "qwen2": "Qwen2SwiftKVForCausalLM"}[family]
        cfg.update(model_type=f"{family}_swiftkv", architectures=[arch], swiftkv=True,
                   num_key_value_layers=self.L, key_value_group_size=self.g)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
