"""Chat templates: the built-in ones `data.chat_template` may name, and putting the run's template
on its tokenizer.

A template is Jinja over `messages` (a list of {role, content}), rendered by the tokenizer's own
`apply_chat_template`, so what Ferry trains on is exactly what the model's users will send. The
built-ins follow the formats' published templates:
  chatml  <|im_start|>{role}\\n{content}<|im_end|>\\n   (Qwen, SmolLM2, OpenHermes)
  llama3  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>   (Llama 3.x)
  zephyr  <|{role}|>\\n{content}</s>\\n   (Zephyr, TinyLlama-Chat; </s> is the tokenizer's EOS)
Each names the tokens its turns are built from: a preset tokenizer (trained in-process) gets them
as special tokens; a pretrained tokenizer must already know them (new embeddings would be
untrained), else the run is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.errors import ConfigError


@dataclass(frozen=True)
class Template:
    source: str
    special_tokens: tuple[str, ...]
    end_of_turn: str | None  # None: the tokenizer's EOS ends a turn


TEMPLATES = {
    "chatml": Template(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
    ),
    "llama3": Template(
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
    ),
    "zephyr": Template(
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        ("<|system|>", "<|user|>", "<|assistant|>"),
        None,
    ),
}


def is_template_source(text: str) -> bool:
    """Whether `text` looks like a Jinja chat template (rather than a misspelt built-in name)."""
    return "{%" in text and "messages" in text


def template_tokens(name: str | None) -> tuple[str, ...]:
    """The special tokens a built-in template's turns are made of (none for Jinja strings)."""
    t = TEMPLATES.get(name or "")
    return t.special_tokens if t else ()


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that close a turn: the tokenizer's EOS and any built-in template's end-of-turn
    token it knows as a special token (a Llama 3 EOS is <|end_of_text|>, its turns end in
    <|eot_id|>)."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for t in TEMPLATES.values():
        if t.end_of_turn in vocab and t.end_of_turn in special:
            ids.add(vocab[t.end_of_turn])
    return ids


def apply_template(tokenizer, chat_template: str | None, is_preset: bool) -> None:
    """Put the run's chat template on `tokenizer` (in place), or refuse a tokenizer without one.

    Args:
        chat_template: data.chat_template: a built-in name, a Jinja string, or None for the
            tokenizer's own template.
        is_preset: the tokenizer was trained for this run (its template tokens were added as
            special tokens); a preset's EOS becomes the template's end-of-turn token, so
            generation stops where a turn ends.

    Raises:
        ConfigError: no template at all, or a built-in whose tokens a pretrained tokenizer lacks.
    """
    if chat_template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                [
                    "data.chat_template=None: the model's tokenizer has no chat template. Set "
                    f"data.chat_template to one of {', '.join(sorted(TEMPLATES))} (the format "
                    "the model was trained with, if any) or to a Jinja template string."
                ]
            )
        return
    builtin = TEMPLATES.get(chat_template)
    if builtin is None:
        tokenizer.chat_template = chat_template
        return
    vocab = tokenizer.get_vocab()
    missing = [t for t in builtin.special_tokens if t not in vocab]
    if missing:
        raise ConfigError(
            [
                f"data.chat_template={chat_template}: the tokenizer does not know the template's "
                f"tokens {missing}, so they would be split into pieces and never learned as turn "
                "markers. Leave data.chat_template unset to use the model's own template, or "
                "pick the template the model was trained with."
            ]
        )
    tokenizer.chat_template = builtin.source
    if is_preset and builtin.end_of_turn:
        tokenizer.eos_token = builtin.end_of_turn
