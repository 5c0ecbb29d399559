"""Where transformers 4.57 and 5.x differ, for the model: each difference is one name here.

The KV cache is `past_key_values` on 4.57 and `cache` on 5.x, as argument and output field:
`CACHE_FIELD` (configuration_chatglm, which loads without its siblings) names this version's, and the
model takes either. The tokenizer's differences stay in tokenization_chatglm.py, which also loads alone.
"""


def given_cache(cache, past_key_values):
    """The KV cache a caller passed under either name (`cache` on 5.x; `past_key_values` on 4.57 and in
    the published API)."""
    return past_key_values if cache is None else cache


def static_cache_length(cache):
    """Slots a compileable (static) cache hands every layer, written or not; None for a growing cache.
    4.57's caches say it with `get_max_length`, 5.x's with `get_max_cache_shape`."""
    if cache is None or not cache.is_compileable:
        return None
    return cache.get_max_length() if hasattr(cache, "get_max_length") else cache.get_max_cache_shape()


def is_chatglm_config(config):
    """Whether `config` is a ChatGLMConfig: tested by attribute, since 5.x imports the config class from a
    module copy of its own, whose class is not this one."""
    return hasattr(config, "quantization_bit")
