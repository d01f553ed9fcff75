# CUDA image for GPU runs of hsr-pl.
#   docker build -t hsr-pl .
#   docker run --gpus all --rm -v /path/to/models:/models:ro -v /path/to/VLGuard:/data/VLGuard:ro \
#       -v "$PWD/runs:/workspace/runs" hsr-pl validate --config configs/models/llava_next_vicuna_7b.yaml
# The recipes in configs/models/ read /models/<checkpoint> and /data/VLGuard/...; outputs go to
# /workspace/runs (mount it to keep them). The embedded demo needs no mounts:
#   docker run --rm hsr-pl validate --config configs/demo.yaml --trainer.accelerator=auto
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    HSR_PL_CACHE=/workspace/.cache/hsr_pl

# The package is built from ./src, which is deleted once installed: a source folder in the working
# directory would shadow the installed package (its callbacks/ joins hsr_pl only at install time).
# The check imports with -I (no working directory on sys.path) and runs the entry point.
WORKDIR /opt/hsr-pl
COPY pyproject.toml README.md ./src/
COPY hsr_pl ./src/hsr_pl
COPY callbacks ./src/callbacks
# The base image's torch (2.7.1, CUDA 12.8) satisfies the package's torch range, so pip keeps it;
# the other requirements are pinned to the versions the test suite ran with.
RUN python -m pip install \
        "lightning==2.6.6" "transformers==5.24.0" "torchmetrics==1.9.0" "datasets==5.2.0" "rich==15.0.0" \
        "matplotlib==3.11.2" "jsonargparse[signatures]==4.53.0" \
    && python -m pip install --no-deps ./src \
    && rm -rf ./src \
    && python -I -c "import hsr_pl.callbacks" \
    && hsr-pl --help > /dev/null

RUN useradd --create-home --uid 1000 hsr
WORKDIR /workspace
COPY --chown=hsr:hsr configs ./configs
COPY --chown=hsr:hsr examples ./examples
RUN mkdir -p /workspace/runs /workspace/.cache && chown -R hsr:hsr /workspace
USER 1000

ENTRYPOINT ["hsr-pl"]
CMD ["--help"]
