"""Run a decoder one block at a time: the calibration hidden states stay, the blocks come and go.

Layer-wise pruning (COMP) only ever needs one decoder block's weights plus the calibration hidden
states. :class:`LayerStream` gives that access pattern over two kinds of model:

- an in-memory model (the GGUF default, or any model already loaded): blocks are just there;
- a *skeleton* built on the ``meta`` device from a checkpoint directory: each block is
  materialised from the safetensors file(s) when asked for and dropped back to ``meta`` after use
  (``store`` first writes the pruned block to a staging shard). Nothing else of the model is ever
  resident, so a model larger than the memory the pruning process may use can still be pruned.

The inputs of each block (attention masks, rotary position embeddings, whatever the architecture's
decoder passes) are captured once by running the real decoder forward with recording stand-ins in
place of the blocks (the GPTQ "catcher" idea), so no architecture's forward is re-implemented here.
"""

from __future__ import annotations

import ctypes
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from core.arch import arch_for, decoder_layers
from core.errors import ModelLoadError

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for block ``idx`` during capture: remembers its kwargs, passes the input through."""

    def __init__(self, idx: int, sink: list[dict[str, Any]], first: list[torch.Tensor], last: bool) -> None:
        super().__init__()
        self.idx, self.sink, self.first, self.last = idx, sink, first, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise ModelLoadError("Decoder blocks called with positional extras; this architecture is not supported.")
        if self.idx == 0:
            self.first.append(hidden_states)
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache", None)
        kwargs["use_cache"] = False
        self.sink.append(kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def _weight_map(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in mapping.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights; streaming needs safetensors.")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


class LayerStream:
    """Block-at-a-time access to a decoder, in memory or streamed from safetensors."""

    def __init__(self, model: Any, source_dir: Path | None = None, staging: Path | None = None) -> None:
        self.model = model
        self.source_dir = source_dir
        self.staging = staging
        self.weights = _weight_map(source_dir) if source_dir is not None else {}
        self.stored: dict[int, Path] = {}
        self.prefix = arch_for(model.config.model_type).layers_attr

    @classmethod
    def from_checkpoint(cls, model_dir: Path, staging: Path) -> LayerStream:
        """A skeleton of ``model_dir`` on ``meta``: config only, no weights resident."""
        from accelerate import init_empty_weights

        fix_mmap_threshold()
        config = AutoConfig.from_pretrained(model_dir)
        arch_for(config.model_type)
        # Parameters on meta; buffers (rotary tables, embedding scales) are small and computed at
        # init, so they are built for real.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval().requires_grad_(False)
        staging.mkdir(parents=True, exist_ok=True)
        stream = cls(model, model_dir, staging)
        stream._retie()
        return stream

    @property
    def streaming(self) -> bool:
        return self.source_dir is not None

    def __len__(self) -> int:
        return len(decoder_layers(self.model))

    # -- materialising -------------------------------------------------------------------------
    def _materialise(self, name: str, module: nn.Module) -> None:
        """Load ``module`` (dotted ``name`` in the checkpoint) from safetensors onto the CPU."""
        state: dict[str, torch.Tensor] = {}
        for key in module.state_dict():
            full = f"{name}.{key}"
            path = self.weights.get(full)
            if path is None:
                raise ModelLoadError(
                    f"{self.source_dir} lacks tensor '{full}'; the checkpoint does not match its config.json."
                )
            with safe_open(str(path), framework="pt") as fh:
                state[key] = fh.get_tensor(full).to(torch.float32)
        module.load_state_dict(state, assign=True, strict=True)

    def layer(self, i: int) -> Any:
        """Block ``i`` with real weights (materialised from disk when streaming)."""
        layer = decoder_layers(self.model)[i]
        if self.streaming and next(layer.parameters()).is_meta:
            self._materialise(f"{self.prefix}.{i}", layer)
        return layer

    def release(self, i: int) -> None:
        """Drop block ``i``'s weights again (streaming); it is unchanged."""
        if self.streaming:
            _drop_params(decoder_layers(self.model)[i])

    def store(self, i: int) -> None:
        """Block ``i`` is final: write it to the staging area and drop its weights (streaming)."""
        if not self.streaming:
            return
        assert self.staging is not None
        layer = decoder_layers(self.model)[i]
        path = self.staging / f"block-{i:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
        self.stored[i] = path
        _drop_params(layer)

    # -- calibration inputs -------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, ids: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
        """Hidden states entering block 0 and each block's forward kwargs, per calibration batch.

        Returns ``(hidden[b], kwargs[b][i])``. Only the embeddings (and the rotary tables) are
        materialised for this, and dropped again afterwards.
        """
        model = self.model
        base = model.get_decoder()
        embed = model.get_input_embeddings()
        padding_idx = getattr(embed, "padding_idx", None)
        placeholder = embed.weight
        if self.streaming:
            # Only the rows of tokens that occur: a compact table and ids renumbered into it (the
            # module itself runs, so architecture-specific embedding scales still apply).
            uniq, inverse = torch.unique(ids, return_inverse=True)
            embed.weight = nn.Parameter(self._embedding_rows(uniq), requires_grad=False)
            embed.padding_idx = None  # only affects gradients; it may lie outside the compact table
            ids = inverse.reshape(ids.shape)
        layers = decoder_layers(model)
        saved = list(layers)
        hidden: list[torch.Tensor] = []
        kwargs: list[list[dict[str, Any]]] = []
        try:
            for start in range(0, ids.shape[0], batch_size):
                sink: list[dict[str, Any]] = []
                first: list[torch.Tensor] = []
                for i in range(len(saved)):
                    layers[i] = _Recorder(i, sink, first, last=i == len(saved) - 1)
                try:
                    base(input_ids=ids[start : start + batch_size], use_cache=False)
                except _Stop:
                    pass
                hidden.append(first[0].detach().float())
                kwargs.append(sink)
        finally:
            for i, layer in enumerate(saved):
                layers[i] = layer
            if self.streaming:
                embed.weight = placeholder
                embed.padding_idx = padding_idx
                trim_heap()
                self._retie()
        return hidden, kwargs

    def _embedding_rows(self, rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Rows ``rows`` (sorted) of the input embedding table, read in chunks from safetensors."""
        name = f"{self.prefix.rsplit('.', 1)[0]}.embed_tokens.weight"
        path = self.weights.get(name)
        if path is None:
            raise ModelLoadError(f"{self.source_dir} lacks '{name}'; the checkpoint does not match its config.json.")
        parts = []
        with safe_open(str(path), framework="pt") as fh:
            table = fh.get_slice(name)
            for start in range(0, int(rows.max()) + 1, chunk):
                sel = rows[(rows >= start) & (rows < start + chunk)]
                if len(sel):
                    block = table[start : start + chunk]
                    parts.append(block[sel - start].to(torch.float32))
        return torch.cat(parts)

    def _retie(self) -> None:
        """Loading with ``assign=True`` replaces the embedding Parameter; a tied head must follow it."""
        head = self.model.get_output_embeddings()
        if head is not None and getattr(self.model.config, "tie_word_embeddings", False):
            head.weight = self.model.get_input_embeddings().weight

    # -- writing the result ------------------------------------------------------------------
    def copy_outside_blocks(self, dest: Path) -> dict[str, int]:
        """Copy every tensor that is not in a decoder block (embeddings, final norm, untied head)
        byte for byte into one safetensors file, in chunks; returns {name: bytes}."""
        block = f"{self.prefix}."
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        keys = [k for k in self.weights if not k.startswith(block) and not (tied and k == "lm_head.weight")]
        return copy_safetensors(keys, self.weights, dest)


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def copy_safetensors(keys: list[str], where: dict[str, Path], dest: Path, chunk: int = 16 << 20) -> dict[str, int]:
    """Write tensors ``keys`` (found in files ``where[key]``) to ``dest`` without loading them:
    a new safetensors header, then each tensor's bytes copied in ``chunk``-sized pieces."""
    headers = {p: _header(p) for p in {where[k] for k in keys}}
    entries, offset = {}, 0
    for k in keys:
        info = headers[where[k]][1][k]
        size = info["data_offsets"][1] - info["data_offsets"][0]
        entries[k] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dest, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for k in keys:
            start, info = headers[where[k]][0], headers[where[k]][1][k]
            begin, end = info["data_offsets"]
            with open(where[k], "rb") as src:
                src.seek(start + begin)
                left = end - begin
                while left:
                    piece = src.read(min(chunk, left))
                    out.write(piece)
                    left -= len(piece)
    return {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in entries.items()}


def _drop_params(module: nn.Module) -> None:
    """Replace every parameter with a ``meta`` placeholder of the same shape (buffers stay), and
    hand the freed memory back to the OS (glibc keeps large freed blocks in its heap otherwise, so
    the resident size would creep up block after block)."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    trim_heap()


def fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve every allocation above ``nbytes`` with its own mmap, returned to the OS on free.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    Gram matrices and weight copies of that size come from the heap and stay resident once freed;
    layer-wise pruning frees such blocks every layer, so the resident size would creep up by
    hundreds of MiB. Setting the threshold explicitly turns that adjustment off (mallopt
    M_MMAP_THRESHOLD = -3). No-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """``malloc_trim(0)`` where glibc provides it (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_block(layer: Any, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Apply one block to every calibration batch (``kwargs[b]`` are that block's inputs)."""
    return [layer(h, **kw) for h, kw in zip(hidden, kwargs, strict=True)]
