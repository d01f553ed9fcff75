# CUDA image for GPU runs of hsr-pl. Build:  docker build -t hsr-pl .
# Run:  docker run --gpus all -v /path/to/models:/models -v $PWD/configs:/configs hsr-pl \
#         validate --config /configs/<your config>.yaml --model.init_args.model /models/<checkpoint>
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/hsr-pl
COPY pyproject.toml README.md ./
COPY hsr_pl ./hsr_pl
COPY callbacks ./callbacks
COPY configs ./configs
# The base image's torch satisfies the package's torch range, so pip keeps the CUDA build.
RUN python -m pip install ".[plot]" && python -c "import hsr_pl.callbacks"

WORKDIR /workspace
ENTRYPOINT ["hsr-pl"]
CMD ["--help"]
