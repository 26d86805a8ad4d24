"""Publish a checkpoint as a Hugging Face folder or a GGUF for llama.cpp.

    python export.py --out_dir=out --to=hf/my-model          # out/ckpt.pt -> hf/my-model/
    hf upload <user>/<repo> hf/my-model                       # the Hub's CLI publishes the folder
    python export.py --out_dir=out --to_gguf=my-model.gguf --llama_cpp=<llama.cpp folder>

hf.py holds the format; llama.cpp's convert_hf_to_gguf.py (--llama_cpp or $LLAMA_CPP_DIR) makes the
GGUF. Each destination is staged as <to>.<pid>.tmp and renamed into place, its parent locked.
"""

import contextlib
from dataclasses import dataclass
import hashlib
import os
import re
import shutil
import subprocess
import sys

import configurator  # first: Ctrl-C during the imports is one line

from checkpoint import build_model, load_checkpoint
from configurator import UserError
from files import die_with_parent, left_by_the_dead, locked_folder, temp_path
from hf import architecture, hf_tokenizer, ranks_text, save_hf
from tokenizer import load_tokenizer

# tiktoken's published sha256 of r50k_base.tiktoken, GPT-2's ranks, in ranks_text's layout
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
CONVERTS = ("llama.cpp converts GPT-2's own BPE (prepare.py --tokenizer=gpt2) as GPT-2, Llama or "
            "Qwen3, and a char or SentencePiece tokenizer as Llama (rope, rmsnorm, swiglu)")


@dataclass
class ExportConfig:
    out_dir: str = "out"      # export: the run to read (shared with train.py and sample.py)
    ckpt: str = "ckpt.pt"     # export: "best.pt" for the best by validation loss
    to: str = ""              # export: the Hugging Face folder to write
    to_gguf: str = ""         # export: a GGUF file for llama.cpp (with --to, made from that folder)
    gguf_type: str = "f32"    # the GGUF's weights: f32 computes as model.py; f16, bf16, q8_0
    llama_cpp: str = ""       # llama.cpp's source folder (convert_hf_to_gguf.py); $LLAMA_CPP_DIR
    overwrite: bool = False   # replace an earlier export

    def __post_init__(self):
        if self.gguf_type not in ("f32", "f16", "bf16", "q8_0"):
            raise ValueError(f"gguf_type must be f32, f16, bf16 or q8_0, got {self.gguf_type!r}")
        if not (self.to or self.to_gguf):
            raise ValueError("give --to=<folder> and/or --to_gguf=<file>: where to export to")


def gguf_problem(tok, c, arch):
    """Why llama.cpp's GGUF would not tokenize and compute as model.py, or None: its GPT-2 and Qwen3
    know a BPE only as a published vocabulary, and its GPT-2's MLP is 4 x n_embd wide."""
    kind = tok.spec["kind"]
    if arch == "gpt2" and c.mlp_width != 4 * c.n_embd:
        return f"llama.cpp's GPT-2 has an MLP 4 x n_embd wide, this one {c.mlp_width}; {CONVERTS}"
    if kind == "tiktoken":
        if hashlib.sha256(ranks_text(tok).encode()).hexdigest() == GPT2_RANKS_SHA256:
            return None
        return f"llama.cpp's converter knows this BPE vocabulary by no published model; {CONVERTS}"
    if arch != "llama":
        return f"llama.cpp's {arch} converter cannot read a {kind} tokenizer as it is; {CONVERTS}"
    if hf_tokenizer(tok) is None:
        return f"this {kind} tokenizer has no Hugging Face form (a unigram model?); {CONVERTS}"
    return None


def converter(cfg):
    """llama.cpp's convert_hf_to_gguf.py, or a UserError that says how to get it."""
    folder = cfg.llama_cpp or os.environ.get("LLAMA_CPP_DIR", "")
    script = os.path.join(folder, "convert_hf_to_gguf.py")
    if not folder or not os.path.isfile(script):
        raise UserError("--to_gguf needs llama.cpp's convert_hf_to_gguf.py"
                        f"{f' (not in {folder})' if folder else ''}: pip download --no-deps "
                        "--no-binary :all: llama-cpp-python, unpack it, and pass --llama_cpp=<it>/"
                        "vendor/llama.cpp (or set LLAMA_CPP_DIR to a llama.cpp checkout)")
    return script


@contextlib.contextmanager
def locked_parents(paths):
    """Each destination's parent locked, then the staging of killed exports there removed."""
    with contextlib.ExitStack() as stack:
        for parent in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
            stack.enter_context(locked_folder(parent, "export.py"))
        for parent, name in map(os.path.split, map(os.path.abspath, paths)):
            for stale in left_by_the_dead(parent, re.escape(name) + r"(?:\.old)?"):
                shutil.rmtree(stale, ignore_errors=True)
        yield


@contextlib.contextmanager
def staging(path):
    """A folder beside `path`, removed at the end; a failure inside (a full disk) is one line."""
    from safetensors import SafetensorError  # transformers' writer of model.safetensors
    folder = temp_path(os.path.abspath(path))
    try:
        os.makedirs(folder)
        yield folder
    except (OSError, RuntimeError, SafetensorError) as e:  # torch's full disk: RuntimeError
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise UserError(f"cannot write {path}: {reason}; an earlier one there is intact") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_destinations(cfg):
    run, to = os.path.realpath(cfg.out_dir), os.path.realpath(cfg.to)
    if cfg.to and os.path.commonpath([run, to]) in (run, to):
        raise UserError(f"--to={cfg.to} overlaps the run {cfg.out_dir} (is it, inside it or holds "
                        "it); export to a folder outside it")  # --overwrite would delete the run
    if os.path.isfile(cfg.to):
        raise UserError(f"--to={cfg.to} is a file; give a folder")
    if os.path.isdir(cfg.to) and os.listdir(cfg.to):
        if not cfg.overwrite:
            raise UserError(f"{cfg.to} exists and is not empty; pick another --to or pass "
                            "--overwrite")
        if not {"config.json", "model.safetensors"} <= set(os.listdir(cfg.to)):
            raise UserError(f"{cfg.to} is not an earlier export (no config.json and "
                            "model.safetensors); --overwrite replaces only an export")
    if os.path.isdir(cfg.to_gguf) or (os.path.isfile(cfg.to_gguf) and not cfg.overwrite):
        raise UserError(f"{cfg.to_gguf} exists; pick another --to_gguf (a file) or pass "
                        "--overwrite")


def export(cfg):
    path = os.path.join(cfg.out_dir, cfg.ckpt)
    checkpoint = load_checkpoint(path, needs=("model", "model_config", "tokenizer"))
    model = build_model(checkpoint, path)  # one line for weights that do not fit or are not finite
    arch, spec = architecture(model.config), checkpoint["tokenizer"]
    if spec.get("pretokenize"):  # a Hugging Face tokenizer runs no Python hook
        raise UserError(f"this model's tokenizer cuts text with the pretokenize hook "
                        f"{spec['pretokenize']}, which transformers cannot run: it would encode "
                        "other ids; only a tokenizer without a hook exports")
    if spec["kind"] == "tiktoken" and spec.get("name", "gpt2") != "gpt2":
        raise UserError(f"the tiktoken encoding {spec['name']} splits text by its own pattern: "
                        "only gpt2 and ranks files (GPT-2's pattern) export")
    tok = load_tokenizer(spec)
    problem = gguf_problem(tok, model.config, arch)
    if problem and cfg.to_gguf:
        raise UserError(f"no GGUF from this model: {problem}")
    script = converter(cfg) if cfg.to_gguf else None
    check_destinations(cfg)  # before the lock, which would write in a run that --to overlaps
    with locked_parents([p for p in (cfg.to, cfg.to_gguf) if p]):
        check_destinations(cfg)
        template = checkpoint.get("chat_template") or {}
        if cfg.to:
            with staging(cfg.to) as folder:
                hf, notes = save_hf(model, tok, template, folder)
                old = temp_path(os.path.abspath(cfg.to) + ".old")  # removed by the next if killed
                if os.path.isdir(cfg.to):
                    os.rename(cfg.to, old)
                os.rename(folder, cfg.to)
                shutil.rmtree(old, ignore_errors=True)
            for note in filter(None, notes + [problem and f"no GGUF: {problem}"]):
                print(f"note: {note}")
            print(f"wrote {cfg.to} ({arch}, {sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M "
                  f"parameters); publish it with: hf upload <user>/<repo> {cfg.to}")
        if cfg.to_gguf:
            with staging(cfg.to_gguf) as folder:
                source = cfg.to or os.path.join(folder, "hf")
                if not cfg.to:
                    save_hf(model, tok, template, source)
                gguf = os.path.join(folder, "model.gguf")  # llama.cpp's converter, as it is
                done = subprocess.run([sys.executable, script, source, "--outfile", gguf,
                                       "--outtype", cfg.gguf_type], capture_output=True,
                                      text=True, preexec_fn=die_with_parent)
                said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
                if done.returncode:
                    raise UserError("llama.cpp's converter failed on the export: "
                                    f"{said[-1] if said else f'exit code {done.returncode}'}")
                os.replace(gguf, cfg.to_gguf)
            print(f"wrote {cfg.to_gguf} ({arch}, {cfg.gguf_type}): llama-cli -m {cfg.to_gguf}")


def main(argv):
    export(configurator.build(ExportConfig, configurator.parse(argv, ExportConfig)))


if __name__ == "__main__":
    configurator.run_script(main)
