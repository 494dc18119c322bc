"""Tiny seeded draft/verifier pair for tests and CI benchmarks: no download, built in about a second.

Both models are small Qwen2 configs with random (seeded) weights and one shared byte-level BPE
tokenizer trained on the fly. The draft is the verifier's first layers with the same embeddings and
head (a layer-skip draft); the verifier's extra layers are damped, so the two agree on the greedy
token well above chance without agreeing always, and both heads are scaled so their distributions
are peaked rather than uniform. `write_gguf` stores either model as an fp32 GGUF for the llama.cpp tests.
`python -m specdec.tiny OUT_DIR` writes the pair to OUT_DIR/draft and OUT_DIR/verifier (configs/rtt-tiny.yaml).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import shutil
from collections.abc import Iterable

import gguf
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
VERIFIER_LAYERS = 4
DRAFT_LAYERS = 2  # the verifier's first DRAFT_LAYERS layers
HIDDEN = 128
EXTRA_LAYER_SCALE = 0.2  # damps the residual writes of the layers the draft skips
HEAD_SCALE = 24.0  # peaks the random logits: verifier entropy ~1.4 nats instead of ~4.7 (max 6.2)
_MARKER = ".specdec-tiny.json"
# ChatML, as the Qwen family uses, so chat endpoints can be tested on the tiny pair
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

DEFAULT_TEXTS = (
    "Speculative decoding pairs a small draft model with a larger verifier. The draft proposes a block "
    "of tokens; the verifier scores the whole block in one forward pass and accepts a prefix of it.",
    "Insulin is a peptide hormone produced by the beta cells of the pancreatic islets. It regulates the "
    "metabolism of carbohydrates, fats and protein by promoting the absorption of glucose from the blood "
    "into liver, fat and skeletal muscle cells.",
    "The patient presented with fever, cough and shortness of breath. A chest radiograph showed bilateral "
    "infiltrates, and the blood culture grew Streptococcus pneumoniae sensitive to penicillin.",
    "Messenger RNA carries the genetic code from DNA in the nucleus to the ribosome, where transfer RNA "
    "molecules bring amino acids that are joined into a polypeptide chain during translation.",
    "Randomized controlled trials assign participants by chance to a treatment or a control group, so "
    "that differences in outcome can be attributed to the intervention rather than to confounding.",
    "Antibiotic resistance arises when bacteria acquire genes, often on plasmids, that let them survive "
    "drugs such as beta-lactams, aminoglycosides, macrolides and fluoroquinolones.",
    "The heart pumps blood through the pulmonary and systemic circulations; the left ventricle generates "
    "the pressure that drives oxygenated blood through the aorta to the tissues of the body.",
    "Neurons communicate across synapses by releasing neurotransmitters such as glutamate, dopamine, "
    "serotonin and gamma-aminobutyric acid, which bind receptors on the postsynaptic membrane.",
)


def _train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with exactly vocab_size ids (padded with unused tokens if the corpus is small)."""
    specials = list(SPECIAL_TOKENS.values())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(specials)}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|unused_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE, **SPECIAL_TOKENS)


def _config(tokenizer: PreTrainedTokenizerFast, vocab_size: int, num_layers: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_models(
    tokenizer: PreTrainedTokenizerFast, vocab_size: int, seed: int
) -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        verifier = Qwen2ForCausalLM(_config(tokenizer, vocab_size, VERIFIER_LAYERS))
        draft = Qwen2ForCausalLM(_config(tokenizer, vocab_size, DRAFT_LAYERS))  # weights overwritten below
    with torch.no_grad():
        verifier.lm_head.weight.mul_(HEAD_SCALE)
        for layer in verifier.model.layers[DRAFT_LAYERS:]:
            layer.self_attn.o_proj.weight.mul_(EXTRA_LAYER_SCALE)
            layer.mlp.down_proj.weight.mul_(EXTRA_LAYER_SCALE)
        # [draft keys] ⊂ [verifier keys]: embeddings, first layers, final norm, head.
        draft.load_state_dict({k: v for k, v in verifier.state_dict().items() if k in draft.state_dict()})
    return draft.eval(), verifier.eval()


def _args_key(vocab_size: int, seed: int, texts: list[str]) -> dict[str, object]:
    corpus = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    return {"vocab_size": vocab_size, "seed": seed, "texts_sha256": corpus, "chat_template": CHAT_TEMPLATE}


def build_tiny_pair(
    out_dir: pathlib.Path, *, vocab_size: int = 512, seed: int = 0, texts: Iterable[str] | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write "draft" and "verifier" model folders (each with the shared tokenizer) under out_dir.

    Deterministic for (vocab_size, seed, texts); an existing complete build with the same arguments
    is returned as is.
    """
    out_dir = pathlib.Path(out_dir)
    corpus = list(DEFAULT_TEXTS if texts is None else texts)
    key = _args_key(vocab_size, seed, corpus)
    draft_dir, verifier_dir = out_dir / "draft", out_dir / "verifier"
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return draft_dir, verifier_dir
    marker.unlink(missing_ok=True)
    tokenizer = _train_tokenizer(corpus, vocab_size)
    draft, verifier = _build_models(tokenizer, vocab_size, seed)
    for folder, model in ((draft_dir, draft), (verifier_dir, verifier)):
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(key))  # written last: a crash mid-build leaves no marker
    logger.info("built tiny pair (vocab %d, seed %d) in %s", vocab_size, seed, out_dir)
    return draft_dir, verifier_dir


def write_gguf(model_dir: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    """Write the tiny model in model_dir (and its tokenizer) as an fp32 GGUF that llama.cpp loads as qwen2.

    The tokenizer is stored the way llama.cpp's converter stores byte-level BPE ("gpt2" model, GPT-2
    pre-tokenizer); the llama.cpp tests feed token ids, so its own tokenizer only has to load.
    """
    config = Qwen2Config.from_pretrained(model_dir)
    tokenizer = json.loads((pathlib.Path(model_dir) / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"] | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    specials = {t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(config.vocab_size)), "ids must be 0..vocab-1"
    added = {t["id"] for t in tokenizer["added_tokens"]}
    types = [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.USER_DEFINED if i in added
             else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_unk_token_id(vocab[tokenizer["model"]["unk_token"]])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for name, tensor in load_file(pathlib.Path(model_dir) / "model.safetensors").items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m specdec.tiny", description="write the tiny seeded draft/verifier "
                                     "pair to OUT_DIR/draft and OUT_DIR/verifier (kept if already built)")
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    draft_dir, verifier_dir = build_tiny_pair(args.out_dir, vocab_size=args.vocab_size, seed=args.seed)
    print(f"draft: {draft_dir}\nverifier: {verifier_dir}")


if __name__ == "__main__":
    main()
