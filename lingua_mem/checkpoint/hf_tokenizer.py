"""The run's tokenizer as transformers reads it: tokenizer.json (the `tokenizers` library) plus
tokenizer_config.json, loaded by AutoTokenizer as a PreTrainedTokenizerFast.

- bytes: a byte-level BPE with no merges (one token per UTF-8 byte, id = the byte), then
  <s> = 256 and </s> = 257;
- sentencepiece: converted from the model's own proto (its normalizer, pieces and merges);
- tiktoken: the ranks as a byte-level BPE with Llama 3's split pattern and special tokens.

Every conversion is checked before it is written: on a set of probe texts it must give the
very ids lingua_mem's tokenizer gives, or the export stops with one line.
"""

from __future__ import annotations

from pathlib import Path

from lingua_mem.data.tokenizer import LLAMA3_SPLIT_PATTERN, llama3_special_tokens, read_bpe_ranks

PROBES = ["Hello, world!", "The capital of France is Paris.", "  two  spaces, a\ttab\nand a newline\n\n",
          "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642", "1234567 3.14159 -0.5e10", "x", "",
          "Ada Lovelace was born on 10 December 1815 in London."]


def _bytes_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char = bytes_to_unicode()  # byte -> the printable character byte-level BPE writes it as
    tok = Tokenizer(models.BPE(vocab={char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok, "<s>", "</s>"


def _sentencepiece_tokenizer(path: str, sp):
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if tok is None:
        raise ValueError(f"tokenizer: {path}: a sentencepiece model transformers cannot convert")
    return tok, sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())


def _tiktoken_tokenizer(path: str):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksFile(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str):  # read by lingua_mem (no tiktoken cache)
            return read_bpe_ranks(tiktoken_url)

    specials = llama3_special_tokens()
    tok = RanksFile(vocab_file=path, pattern=LLAMA3_SPLIT_PATTERN, extra_special_tokens=specials).converted()
    return tok, specials[0], specials[1]


def hf_tokenizer(tok, tok_cfg: dict):
    """A transformers PreTrainedTokenizerFast equal to lingua_mem's tokenizer `tok` (BOS
    prepended, no EOS, as lingua_mem prompts); ValueError (one line) when the conversion
    encodes a probe text differently."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    name = tok_cfg["name"]
    if name == "bytes":
        obj, bos, eos = _bytes_tokenizer()
    elif name == "sentencepiece":
        obj, bos, eos = _sentencepiece_tokenizer(tok_cfg["path"], tok.sp)
    elif name == "tiktoken":
        obj, bos, eos = _tiktoken_tokenizer(tok_cfg["path"])
    else:
        raise ValueError(f"tokenizer: {name!r} has no transformers conversion")
    if obj.token_to_id(bos) != tok.bos_id or obj.token_to_id(eos) != tok.eos_id:
        raise ValueError(f"tokenizer: the transformers conversion of {name} gives BOS/EOS ids "
                         f"{obj.token_to_id(bos)}/{obj.token_to_id(eos)}, not {tok.bos_id}/{tok.eos_id}")
    obj.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.bos_id)])
    # split_special_tokens: "<s>" inside a text is text, as lingua_mem's tokenizers read it
    hf = PreTrainedTokenizerFast(tokenizer_object=obj, bos_token=bos, eos_token=eos, pad_token=eos,
                                 split_special_tokens=True)
    for text in [*PROBES, f"special text {bos} and {eos} stays text"]:
        ours, theirs = tok.encode(text, add_bos=True, add_eos=False), hf(text)["input_ids"]
        if ours != theirs:
            raise ValueError(f"tokenizer: the transformers conversion of {name} encodes {text!r} as "
                             f"{theirs[:12]}, lingua_mem as {ours[:12]}; export with --no-tokenizer")
    return hf


def save_hf_tokenizer(tok, tok_cfg: dict, out: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (and the rest transformers saves) into out."""
    hf_tokenizer(tok, tok_cfg).save_pretrained(str(out))
