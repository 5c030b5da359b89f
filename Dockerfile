# Lung Vision node and worker (one image; the command picks the role): CPU-only PyTorch.
#   docker build -t lungvision:0.1.0 .
#   docker run --rm lungvision:0.1.0 config
FROM python:3.11-slim

# GLIBC_TUNABLES: transparent huge pages for malloc's large blocks (worker/preload.py, HUGE_PAGES_TUNABLE)
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU wheels first, from the PyTorch CPU index, so the project's pins (torch==2.14.1,
# torchvision==0.29.1) are already satisfied and no CUDA wheels are pulled from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/lungvision
COPY pyproject.toml README.md ./
COPY common ./common
COPY config ./config
COPY dicom_node ./dicom_node
COPY worker ./worker
COPY inference ./inference
COPY lungvision ./lungvision
COPY web ./web
RUN pip install . \
    && python -c "import torch; assert not torch.cuda.is_available() and torch.__version__.startswith('2.14.1')"

# Non-root; /var/lib/lungvision (spool, outbox, outcome store) is the volume node and workers share.
RUN groupadd --system --gid 10001 lungvision \
    && useradd --system --uid 10001 --gid lungvision --home-dir /var/lib/lungvision --shell /usr/sbin/nologin lungvision \
    && mkdir -p /var/lib/lungvision/spool /var/lib/lungvision/outbox \
    && chown -R lungvision:lungvision /var/lib/lungvision
ENV LUNGVISION_SPOOL__DIR=/var/lib/lungvision/spool \
    LUNGVISION_WORKER__OUTBOX_DIR=/var/lib/lungvision/outbox \
    LUNGVISION_STORE__URL=sqlite:////var/lib/lungvision/lungvision.db
USER lungvision
WORKDIR /var/lib/lungvision
VOLUME ["/var/lib/lungvision"]
EXPOSE 11112 8080

ENTRYPOINT ["lungvision"]
CMD ["--help"]
