"""Tokenizers and models: pretrained (HF id, local dir, GGUF) or a small random-init preset, + LoRA.

`build_model` is the entry point on workers; `load_tokenizer_for` and `check_lora_fits` run on the
driver before training starts. `load_pretrained` is the one place a base model is loaded from its
source (id or folder, GGUF file, revision, trust_remote_code): training, feature extraction and
analysis all go through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from trainers.chat_templates import apply_template, template_tokens
from trainers.config import ModelConfig, RunSpec
from trainers.storage import is_uri, localize
from trainers.tasks import TASKS

PRESETS = {
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "small-llama": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    "tiny-bert": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    ),
    "tiny-t5": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16),
}


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a `train.precision` value."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_tokenizer_for(spec: RunSpec, texts: Callable[[], Iterator[str]] | None):
    """The run's tokenizer: trained on the training text for presets, else from_pretrained."""
    chat = spec.task.type == "chat"
    if spec.model.preset:
        assert texts is not None, "presets train their tokenizer on the training text"
        tok = _train_tokenizer(
            spec.model.preset,
            spec.model.preset_vocab_size,
            texts(),
            template_tokens(spec.data.chat_template) if chat else (),
        )
        if chat:
            apply_template(tok, spec.data.chat_template, is_preset=True)
        return tok
    from transformers import AutoTokenizer

    m = spec.model
    tok = AutoTokenizer.from_pretrained(
        m.source, gguf_file=m.gguf_file, revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    if tok.pad_token is None:
        # Llama-style tokenizers ship without a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None and spec.task.type in (
        "causal_lm",
        "chat",
        "summarization",
        "question_answering",
    ):
        tok.eos_token = tok.sep_token or tok.pad_token
    if chat:
        apply_template(tok, spec.data.chat_template, is_preset=False)
    return tok


def _train_tokenizer(
    preset: str, vocab_size: int, texts: Iterator[str], extra_specials: tuple[str, ...] = ()
):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if preset == "tiny-bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(
            texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        )
        tok.post_processor = processors.TemplateProcessing(
            # Second segment (QA context) gets token type 1, as in BERT's pretraining.
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[
                ("[CLS]", tok.token_to_id("[CLS]")),
                ("[SEP]", tok.token_to_id("[SEP]")),
            ],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    # A chat template's turn markers are whole tokens, as in the models that use them.
    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_specials]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=list(extra_specials),
    )


def model_config(spec: RunSpec, tokenizer, label_names: list[str] | None):
    """The transformers config of the run's model (no weights loaded)."""
    import transformers

    m = spec.model
    extra = {}
    if label_names:
        extra = dict(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    if m.preset:
        cls = {"tiny-bert": transformers.BertConfig, "tiny-t5": transformers.T5Config}.get(
            m.preset, transformers.LlamaConfig
        )
        ids: dict = {}
        if tokenizer is not None:  # None when only layer shapes are needed (validate)
            ids["pad_token_id"] = tokenizer.pad_token_id
            if m.preset != "tiny-bert":
                ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
            if m.preset == "tiny-t5":
                # T5 starts decoding from the pad token.
                ids["decoder_start_token_id"] = tokenizer.pad_token_id
        if m.preset not in ("tiny-bert", "tiny-t5"):
            # No KV cache in training; with one, transformers skips packed-sequence masking.
            ids.update(tie_word_embeddings=True, use_cache=False)
        vocab = len(tokenizer) if tokenizer is not None else m.preset_vocab_size
        return cls(vocab_size=vocab, **PRESETS[m.preset], **ids, **extra)
    cfg = transformers.AutoConfig.from_pretrained(
        m.source,
        gguf_file=m.gguf_file,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        **extra,
    )
    if getattr(cfg, "pad_token_id", None) is None and tokenizer is not None:
        # Sequence classification on decoder models finds the last real token via pad_token_id.
        cfg.pad_token_id = tokenizer.pad_token_id
    return cfg


def build_model(
    spec: RunSpec, tokenizer, label_names: list[str] | None, ds_config: dict | None = None
):
    """The model to train: pretrained or preset, LoRA-wrapped when method=lora.

    Under ZeRO-3 (`ds_config` stage 3) transformers builds the model inside `deepspeed.zero.Init`,
    so no rank ever holds the full set of weights.
    """
    import transformers

    torch.manual_seed(spec.run.seed)
    cfg = model_config(spec, tokenizer, label_names)
    cls = TASKS[spec.task.type].model_class(transformers, spec, cfg)
    with _zero3_context(ds_config, cfg):
        if spec.model.preset:
            model = cls.from_config(cfg)
        else:
            model = load_pretrained(cls, spec.model, config=cfg)
    if spec.method == "lora":
        model = apply_lora(model, spec)
    return model


def load_pretrained(cls, m: ModelConfig, dtype: torch.dtype = torch.float32, **kwargs):
    """`cls.from_pretrained` on the base model `m` names, in `dtype` (kwargs pass through, e.g.
    config=, output_loading_info=). A URI source is copied to a local folder first."""
    source = m.source
    if source and is_uri(source):
        source = localize(source)
    loaded = cls.from_pretrained(
        source,
        gguf_file=m.gguf_file,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        dtype=dtype,
        **kwargs,
    )
    if m.gguf_file:
        _drop_gguf_marker(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded


def load_tokenizer(uri: str):
    """Load a tokenizer Ferry saved (data cache, export; local path or URI)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(localize(uri))


def _drop_gguf_marker(model) -> None:
    """transformers dequantizes GGUF weights to plain torch tensors while loading, but keeps a
    GGUF "quantizer" on the model whose only effect is that save_pretrained refuses to save
    ("quantized with gguf and is not serializable"): a full fine-tune could not be exported.
    The weights are ordinary float tensors, so the marker is dropped."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def _zero3_context(ds_config: dict | None, cfg):
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    import importlib

    from transformers.integrations import HfDeepSpeedConfig

    # Import the modeling module before zero.Init patches nn.Module construction: otherwise
    # building the model raises "TypeError: Signature mismatch" (seen with deepspeed 0.19).
    model_type = cfg.model_type.replace("-", "_")
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers reads it through a weakref
    try:
        yield
    finally:
        del keep_alive


def lora_targets(spec: RunSpec, model_type: str) -> list[str] | str:
    """Target modules: the config's, else PEFT's per-architecture default, else all linear
    layers."""
    if spec.lora.target_modules:
        return spec.lora.target_modules
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    return list(defaults.get(model_type, [])) or "all-linear"


def apply_lora(model, spec: RunSpec):
    import peft

    task_type = peft_task_type(spec, model.config)
    cfg = peft.LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=lora_targets(spec, model.config.model_type),
        task_type=task_type,
    )
    # SEQ_CLS (QUESTION_ANS) makes PEFT train and save the classification (span) head
    # (modules_to_save) with the adapter.
    return peft.get_peft_model(model, cfg)


def peft_task_type(spec: RunSpec, config) -> str:
    """PEFT's task type for the run: it picks the PeftModel class and which heads are trained."""
    if spec.task.type == "sequence_classification":
        return "SEQ_CLS"
    if spec.task.type == "question_answering" and spec.task.qa_style == "extractive":
        return "QUESTION_ANS"
    return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"


def check_lora_fits(spec: RunSpec, tokenizer, label_names: list[str] | None) -> list[str]:
    """LoRA rank <= the smallest dimension of every adapted layer; targets must exist.

    Builds the model on the meta device (no memory, no weights) to read layer shapes.
    """
    if spec.method != "lora":
        return []
    import transformers

    cfg = model_config(spec, tokenizer, label_names)
    with torch.device("meta"):
        model = TASKS[spec.task.type].model_class(transformers, spec, cfg).from_config(cfg)
    targets = lora_targets(spec, cfg.model_type)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if targets == "all-linear":
        heads = ("lm_head", "score", "classifier", "qa_outputs")
        chosen = {n: m for n, m in linears.items() if not n.endswith(heads)}
    else:
        chosen = {n: m for n, m in linears.items() if n.split(".")[-1] in targets}
    if not chosen:
        return [
            f"lora.target_modules={targets}: no linear layer of this {cfg.model_type} model "
            "matches. "
            f"Use names such as {sorted({n.split('.')[-1] for n in linears})[:8]}."
        ]
    name, layer = min(chosen.items(), key=lambda kv: min(kv[1].in_features, kv[1].out_features))
    limit = min(layer.in_features, layer.out_features)
    if spec.lora.rank > limit:
        return [
            f"lora.rank={spec.lora.rank}: must be <= the smallest adapted layer dimension "
            f"({limit}, {name}). Lower lora.rank to {limit} or less."
        ]
    return []


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned params report their full size."""

    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total
