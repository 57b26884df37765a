"""One denoiser call for every supported model class: ``eps = denoiser(x_t, t, cond)``.

``cond`` holds one *condition key* per sample (int64): a class label, an index into the prompt
embeddings, or :data:`NULL` for the unconditional input of classifier-free guidance (CFG); an
unconditional model takes no ``cond``. Calibration records carry their keys, so dumping, LES,
reconstruction, activation calibration and sampling all make the same call whatever the model:

* unconditional pixel or latent ``UNet2DModel``: ``unet(x, t)``;
* class-conditional (``num_class_embeds``): ``unet(x, t, class_labels=...)``, the NULL key mapped to
  the null class, the last row of the class embedding (the convention of LDM cin256-v2 and DiT);
* class-conditional through cross-attention (LDM cin256-v2, a class embedding table beside the UNet):
  ``unet(x, t, encoder_hidden_states=...)``, one context token, the class's row of the table;
* text-to-image ``UNet2DConditionModel``: ``unet(x, t, encoder_hidden_states=...)``, the keys
  indexing CLIP embeddings of the prompts computed once, NULL the empty prompt's.

Latent models are denoised in latent space; :func:`decode` maps latents to pixels for samples and FID.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.models.local import Layout, find_layout, load_autoencoder, load_class_embedding, load_text_encoder

NULL = -1  # condition key of the unconditional branch of classifier-free guidance
PROMPT_COLUMNS = ("caption", "prompt", "text")


class Denoiser(nn.Module):
    """A UNet with its conditioning; ``forward`` returns the noise prediction as a tensor."""

    def __init__(
        self,
        unet: nn.Module,
        prompt_embeddings: torch.Tensor | None = None,
        null_embedding: torch.Tensor | None = None,
        class_embeddings: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        num_class_embeds = getattr(unet.config, "num_class_embeds", None)
        # cross-attention class conditioning: (classes + 1, 1 token, width), the last row the null class
        table = None if class_embeddings is None else class_embeddings[:, None]
        self.register_buffer("class_embeddings", table)
        if table is not None:
            num_class_embeds = len(table)
        if prompt_embeddings is not None:
            self.kind = "text"
            # row P is the empty prompt: key NULL (-1) indexes it from the end
            self.register_buffer("embeddings", torch.cat([prompt_embeddings, null_embedding[None]]))
            self.num_conditions = len(prompt_embeddings)
        elif num_class_embeds is not None:
            self.kind = "class"
            self.null_class = num_class_embeds - 1
            self.num_conditions = num_class_embeds - 1
        else:
            self.kind = "unconditional"
            self.num_conditions = 0

    def with_unet(self, unet: nn.Module) -> "Denoiser":
        """The same conditioning around another UNet of the same model (e.g. its quantized copy)."""
        if self.kind == "text":
            return Denoiser(unet, prompt_embeddings=self.embeddings[:-1], null_embedding=self.embeddings[-1])
        if self.class_embeddings is not None:
            return Denoiser(unet, class_embeddings=self.class_embeddings[:, 0])
        return Denoiser(unet)

    @property
    def conditional(self) -> bool:
        return self.kind != "unconditional"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the UNet's input: pixels, or latents for a latent model."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return self.unet.config.in_channels, height, width

    def condition_keys(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The condition of sample ``i``: class / prompt ``i mod count``, so a sample's condition, like
        its noise, depends on its index alone."""
        return indices.long() % self.num_conditions if self.conditional else None

    def unet_kwargs(self, cond: torch.Tensor | None) -> dict:
        if not self.conditional:
            return {}
        if cond is None:
            raise ValueError(f"a {self.kind}-conditional model needs condition keys (cond)")
        if self.kind == "class":
            labels = torch.where(cond == NULL, self.null_class, cond)
            if self.class_embeddings is not None:
                return {"encoder_hidden_states": self.class_embeddings[labels]}
            return {"class_labels": labels}
        return {"encoder_hidden_states": self.embeddings[cond]}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, **self.unet_kwargs(cond), return_dict=False)[0]

    def guided(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Classifier-free guidance: the unconditional and conditional inputs in one batch,
        ``eps_u + scale · (eps_c − eps_u)``; a plain call for unconditional models or scale 1."""
        if not self.conditional or scale == 1:
            return self(x, t, cond)
        keys = torch.cat([torch.full_like(cond, NULL), cond])
        eps_u, eps_c = self(torch.cat([x, x]), t, keys).chunk(2)
        return eps_u + scale * (eps_c - eps_u)


def probe_kwargs(unet: nn.Module, batch: int = 1, device: torch.device | str = "meta", text_length: int = 77) -> dict:
    """Conditioning inputs for a forward pass that only needs shapes (e.g. on the meta device): a class
    label, or text embeddings of CLIP's length (77 tokens), as the UNet's config asks."""
    c = unet.config
    kwargs = {}
    if getattr(c, "num_class_embeds", None) is not None:
        kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    if getattr(c, "cross_attention_dim", None) is not None:
        kwargs["encoder_hidden_states"] = torch.zeros(batch, text_length, c.cross_attention_dim, device=device)
    return kwargs


def as_denoiser(model: nn.Module) -> Denoiser:
    """``model`` itself if it is a Denoiser, else an unconditional UNet wrapped in one."""
    return model if isinstance(model, Denoiser) else Denoiser(model)


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a local file: .txt (one per line), .csv (column caption, prompt or text, else the
    first), .json (a list of strings or of objects with one of those keys, or COCO captions with
    ``annotations``). With ``limit`` only the first ``limit``: sample i uses prompt i mod count, so
    ``limit`` samples never reach further, and a large caption file is not encoded whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines()]
    elif suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"prompts file {path} has no rows below its header")
        column = next((c for c in PROMPT_COLUMNS if c in rows[0]), next(iter(rows[0])))
        prompts = [row[column].strip() for row in rows]
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"prompts file {path} is not valid JSON: {error}") from None
        items = data.get("annotations", data) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"prompts file {path}: expected a list of prompts (or COCO 'annotations')")
        prompts = [_prompt_of(item, path) for item in items]
    else:
        raise ValueError(f"prompts file {path}: unsupported type {suffix!r}; use .txt, .csv or .json")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts[:limit]


def _prompt_of(item, path: Path) -> str:
    if isinstance(item, str):
        return item.strip()
    if isinstance(item, dict):
        for key in PROMPT_COLUMNS:
            if isinstance(item.get(key), str):
                return item[key].strip()
    raise ValueError(
        f"prompts file {path}: an entry has none of the keys {', '.join(PROMPT_COLUMNS)}: {str(item)[:80]}"
    )


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """CLIP last hidden states (P, L, D), padded to the tokenizer's length as Stable Diffusion does."""
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(
            prompts[start : start + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out.append(text_encoder(tokens.input_ids.to(text_encoder.device))[0])
    return torch.cat(out)


def load_denoiser(folder: str | Path, unet: nn.Module, prompts: list[str] | None = None) -> Denoiser:
    """``unet`` (FP or quantized, loaded from ``folder``) with the conditioning of the model in
    ``folder``: for a text-to-image model, the CLIP embeddings of ``prompts`` (condition key i is
    ``prompts[i]``, so calibration records must be read with the prompts they were dumped with)."""
    layout = find_layout(folder)
    if layout.class_embedding is not None:
        return Denoiser(unet, class_embeddings=load_class_embedding(layout))
    if layout.text_encoder is None:
        return Denoiser(unet)
    if not prompts:
        raise ValueError(f"{folder} is a text-to-image model: it needs prompts (calib.prompts / sample.prompts)")
    encoder, tokenizer = load_text_encoder(layout)
    embeddings = encode_prompts(encoder, tokenizer, prompts)
    null = encode_prompts(encoder, tokenizer, [""])[0]
    return Denoiser(unet, prompt_embeddings=embeddings, null_embedding=null)


class Decoder:
    """Latents to pixels in [-1, 1] with the model's autoencoder (VQModel or AutoencoderKL); the
    identity for a pixel-space model."""

    def __init__(self, layout: Layout, device: torch.device | str = "cpu") -> None:
        self.autoencoder = load_autoencoder(layout)
        self.device = torch.device(device)
        if self.autoencoder is not None:
            self.autoencoder.to(self.device)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        if self.autoencoder is None:
            return latents
        ae = self.autoencoder
        images = [
            ae.decode(chunk.to(self.device) / ae.config.scaling_factor).sample.clamp(-1, 1).cpu()
            for chunk in latents.split(batch_size)
        ]
        return torch.cat(images)
