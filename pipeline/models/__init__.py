"""The models: the embedded digits UNet and classifier, local diffusers folders, one denoiser call
for every model class, DDIM sampling, and the quantized UNet assembled from artifacts."""
