# The image of cluster.yaml's nodes and serve/rayservice.yaml's pods:
#   docker build -t dialclip-ray:0.1.0-py311-gpu .   (then push it where your nodes pull from)
# Ray's own GPU image (CUDA, Ray 2.60, Python 3.11) plus this project and its pinned dependencies,
# so nodes start without installing torch/open_clip/faiss at boot.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/dialclip-ray
# Dependencies first (a layer reused while only the code changes).
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users dialclip_ray/__init__.py dialclip_ray/__init__.py
RUN pip install --no-cache-dir -c constraints.txt -e . \
    && pip uninstall -y dialclip-ray
COPY --chown=ray:users dialclip_ray dialclip_ray
COPY --chown=ray:users configs configs
COPY --chown=ray:users serve serve
COPY --chown=ray:users tune tune
COPY --chown=ray:users jobs jobs
RUN pip install --no-cache-dir --no-deps -c constraints.txt -e .

# One weights cache and one path prefix on every node: /shared is the shared filesystem
# (cluster.yaml: EFS; rayservice.yaml: the dialclip-artifacts volume). Fill it once with
# `dialclip weights fetch --backbone ViT-B-32 --pretrained openai`.
ENV DIALCLIP_WEIGHTS_DIR=/shared/weights \
    DIALCLIP_CACHE_DIR=/tmp/dialclip-cache
