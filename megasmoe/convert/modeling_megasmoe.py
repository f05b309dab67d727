"""A megasmoe MoE decoder as a Hugging Face model, for what no standard architecture
holds exactly (exported with ``--remote-code``; load with ``trust_remote_code=True``).

Self-contained: imports only torch and transformers, because ``megasmoe convert to-hf
--remote-code`` copies this file into the export directory. It is the same network as
megasmoe's megatron-core GPTModel: RMSNorm pre-norm blocks, RoPE over the whole head,
grouped-query attention (optionally a head width of its own, q/k/v biases, and q/k
norms per head as in Qwen3-MoE or full-width as in OLMoE), SwiGLU experts,
an optional (sigmoid-gated) shared expert, optional dense layers, and a softmax router whose
linear gate may carry a per-expert logit **bias** (HyperRouter's generated b, DSMoE's
steering bias), which of the standard targets only GPT-OSS has (with other parts):

    logits = x W^T + b;  p = softmax(logits);  top-k of p;  renormalise if norm_topk_prob;
    times routed_scaling_factor.

Loss, logits and ``generate``; there is no KV cache, so each generated token
re-reads the whole sequence (fine for evaluation, slow for long generations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["MegasmoeMoeConfig", "MegasmoeMoeForCausalLM"]


class MegasmoeMoeConfig(PretrainedConfig):
    """Shape and routing of an exported megasmoe model (field names as in Qwen2-MoE)."""

    model_type = "megasmoe_moe"

    def __init__(self, vocab_size=4096, hidden_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, head_dim=None,
                 intermediate_size=512,
                 moe_intermediate_size=256, shared_expert_intermediate_size=0,
                 shared_expert_gate=False, mlp_only_layers=None, num_experts=8, num_experts_per_tok=2,
                 norm_topk_prob=True, routed_scaling_factor=None, router_bias=True,
                 qk_norm="none", attention_bias=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                 partial_rotary_factor=1.0,
                 max_position_embeddings=4096, tie_word_embeddings=False,
                 initializer_range=0.02, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size  # dense layers (mlp_only_layers)
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.mlp_only_layers = list(mlp_only_layers or [])
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.router_bias = router_bias
        self.qk_norm = qk_norm
        self.attention_bias = attention_bias  # on q/k/v only (Qwen's layout)
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor  # RoPE on the first dims only
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class MegasmoeRMSNorm(nn.Module):
    """RMSNorm in fp32, like megasmoe's (and Llama's)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MegasmoeAttention(nn.Module):
    """Causal grouped-query attention with RoPE (and optional full-width q/k norms)."""

    def __init__(self, config: MegasmoeMoeConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "full":  # over all heads at once (OLMoE)
            self.q_norm = MegasmoeRMSNorm(self.heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = MegasmoeRMSNorm(self.kv_heads * self.head_dim, config.rms_norm_eps)
        elif config.qk_norm == "head":  # each head on its own (Qwen3-MoE)
            self.q_norm = MegasmoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = MegasmoeRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.heads, self.head_dim)
        k = k.view(b, s, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        rot = cos.shape[-1]  # RoPE turns the first `rot` dimensions of each head
        q = torch.cat((_rope(q[..., :rot], cos, sin), q[..., rot:]), dim=-1)
        k = torch.cat((_rope(k[..., :rot], cos, sin), k[..., rot:]), dim=-1)
        groups = self.heads // self.kv_heads  # query head h reads key/value head h // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MegasmoeMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MegasmoeMoE(nn.Module):
    """Softmax router with an optional logit bias, top-k routed experts, shared expert."""

    def __init__(self, config: MegasmoeMoeConfig):
        super().__init__()
        h = config.hidden_size
        self.topk = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.gate = nn.Linear(h, config.num_experts, bias=config.router_bias)
        self.experts = nn.ModuleList(
            MegasmoeMLP(h, config.moe_intermediate_size) for _ in range(config.num_experts))
        self.shared_expert = (MegasmoeMLP(h, config.shared_expert_intermediate_size)
                              if config.shared_expert_intermediate_size else None)
        self.shared_expert_gate = (nn.Linear(h, 1, bias=False)
                                   if self.shared_expert is not None and config.shared_expert_gate
                                   else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        # Routing in fp32, as megasmoe routes (moe.router_dtype).
        logits = F.linear(flat.float(), self.gate.weight.float(),
                          None if self.gate.bias is None else self.gate.bias.float())
        probs, chosen = torch.topk(torch.softmax(logits, dim=-1), self.topk, dim=-1)
        if self.normalize:
            probs = probs / probs.sum(dim=-1, keepdim=True)
        if self.scaling is not None:
            probs = probs * self.scaling
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            if token.numel():
                y = expert(flat[token]) * probs[token, slot, None].to(flat.dtype)
                out.index_add_(0, token, y)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(shape)


class MegasmoeDecoderLayer(nn.Module):
    """Pre-norm attention block, then a pre-norm MoE (or dense) block."""

    def __init__(self, config: MegasmoeMoeConfig, index: int):
        super().__init__()
        self.input_layernorm = MegasmoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MegasmoeAttention(config)
        self.post_attention_layernorm = MegasmoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (MegasmoeMLP(config.hidden_size, config.intermediate_size)
                    if index in config.mlp_only_layers else MegasmoeMoE(config))

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MegasmoeMoePreTrainedModel(PreTrainedModel):
    """Weight init and config class of the megasmoe export."""

    config_class = MegasmoeMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegasmoeDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MegasmoeRMSNorm):
            nn.init.ones_(module.weight)


class MegasmoeMoeModel(MegasmoeMoePreTrainedModel):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: MegasmoeMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MegasmoeDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = MegasmoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        s = input_ids.shape[1]
        dim = int(self.config.head_dim * self.config.partial_rotary_factor)
        inv_freq = 1.0 / (self.config.rope_theta
                          ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
        angles = torch.outer(torch.arange(s, dtype=torch.float32, device=x.device), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class MegasmoeMoeForCausalLM(MegasmoeMoePreTrainedModel, GenerationMixin):
    """The language model: logits and the shifted next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegasmoeMoeConfig):
        super().__init__(config)
        self.model = MegasmoeMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No KV cache: every generation step reads the whole sequence."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        logits = self.lm_head(self.model(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
