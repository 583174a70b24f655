"""`NestlearnForCausalLM`: any registered nestlearn model behind transformers' causal-LM API.

The model's explicit state (attention caches, memories, CMS) rides in a `NestlearnCache`, so
`generate` reads the prompt once and then feeds one token per step, like
`nestlearn.generate.sample_ids`. transformers' own caches are per-layer key/value stores;
nestlearn states are not, so the wrapper opts out of them (`_supports_default_dynamic_cache`)
and `forward` makes its cache, as transformers' recurrent models do. transformers' generation
loop then hands the cache back and slices the input to the new token itself (and, to continue a
returned cache, to the tokens past `get_seq_length()`), so the wrapper keeps transformers'
`prepare_inputs_for_generation`. The cache is not a transformers `Cache`: that class's layer-wise operations (reorder,
crop, batch select) would be silent no-ops on a state that has no layers.

Greedy search and sampling are supported. Beam search (and every mode built on it) needs the
state reordered across rows, which not every state allows (in-context CMS sums its segment
loss over the batch), so it is refused; so are assisted and contrastive decoding, which
rewind the cache. Padding cannot be skipped by a recurrent state: an `attention_mask` with
zeros is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationConfig, GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from nestlearn import models
from nestlearn.hf.config import NestlearnConfig
from nestlearn.models.base import LanguageModel

_UNSUPPORTED_INPUTS = ("inputs_embeds", "position_ids", "output_attentions", "output_hidden_states")


class NestlearnCache:
    """A nestlearn model's state after the tokens seen so far, and how many there were.

    Updated in place by each `forward` that is given it, as transformers' caches are; copy it
    (`NestlearnCache(cache.state, cache.seen)`) to branch, since nestlearn states are never
    modified, only replaced. It cannot be cropped, reordered or compiled.
    """

    is_compileable = False  # read by transformers' generation loop: no compiled decoding,
    is_croppable = False  # and no rewinding (assisted decoding, deferred stop checks)

    def __init__(self, state: Any = None, seen: int = 0) -> None:
        self.state = state
        self.seen = seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (transformers slices the prompt with it when it continues a cache)."""
        return self.seen

    def update(self, state: Any, new_tokens: int) -> None:
        self.state = state
        self.seen += new_tokens

    def __repr__(self) -> str:
        return f"NestlearnCache(seen={self.seen})"


class NestlearnForCausalLM(PreTrainedModel, GenerationMixin):  # type: ignore[no-untyped-call]
    """`nestlearn.models.build(config.model_config)` as `self.model`, or ``model`` itself when
    given (a trained `LanguageModel` whose config this one describes)."""

    config_class = NestlearnConfig
    config: NestlearnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _input_embed_layer = "embed"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # noqa: RUF012 (transformers' API)

    def __init__(self, config: NestlearnConfig, model: LanguageModel | None = None) -> None:
        super().__init__(config)
        if model is not None and model.config != config.model_config:
            raise ValueError("the model's config differs from config.nestlearn; build the config "
                             "with NestlearnConfig.from_model_config(model.config)")
        self.model = model if model is not None else models.build(config.model_config)
        self.post_init()  # type: ignore[no-untyped-call]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state lives in a NestlearnCache, made by `forward`

    def _validate_generation_mode(self, generation_mode: GenerationMode,
                                  generation_config: GenerationConfig,
                                  generation_mode_kwargs: dict[str, Any]) -> None:
        if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(f"nestlearn models generate by greedy search or sampling, not "
                             f"{generation_mode.value}: their state cannot be reordered across beams "
                             "or rewound (use num_beams=1 and no assistant)")
        # transformers annotates `self` with a protocol this class does not name
        super()._validate_generation_mode(  # type: ignore[misc]
            generation_mode, generation_config, generation_mode_kwargs)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: nestlearn's builders initialise their own weights, and transformers' generic
        initialisation would overwrite them."""

    def forward(self, input_ids: torch.Tensor | None = None, cache: NestlearnCache | None = None,
                use_cache: bool | None = None, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_dict: bool | None = None,
                past_key_values: NestlearnCache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple[Any, ...]:
        """Logits of ``input_ids`` (B, T) continuing ``cache`` (``past_key_values``, its name
        before transformers 5), and, with ``use_cache`` (default: the config's, off in training),
        the cache after them. ``labels``: the next-token cross entropy, shifted inside
        (``labels = input_ids`` is right; -100 is ignored)."""
        if input_ids is None:
            raise ValueError("nestlearn models take input_ids (inputs_embeds are not supported)")
        unsupported = [k for k in _UNSUPPORTED_INPUTS if kwargs.get(k) not in (None, False)]
        if unsupported:
            raise ValueError(f"nestlearn models do not support {', '.join(unsupported)}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nestlearn models carry a recurrent state and cannot skip padding: "
                             "give rows of equal length, without zeros in attention_mask")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, NestlearnCache):
            raise ValueError(f"cache must be a NestlearnCache (or None), got {type(cache).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        logits, state = self.model(input_ids, None if cache is None else cache.state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        if use_cache:
            cache = cache if cache is not None else NestlearnCache()
            cache.update(state, input_ids.shape[1])
        # transformers annotates `cache` as its own Cache class, which a NestlearnCache is not
        out = CausalLMOutputWithPast(loss=loss, logits=logits,
                                     cache=cache if use_cache else None)  # type: ignore[arg-type]
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()
