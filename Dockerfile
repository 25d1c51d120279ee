# secvec runtime image: the official Ray image (Ray head, workers and the job driver) with secvec
# installed; `secvec run` / `secvec submit` are on PATH. Used by charts/secvec and k8s/.
#   docker build -t secvec:0.1.0 .
#   docker build -t secvec:0.1.0-gpu --build-arg RAY_VARIANT=py311-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# RAY_VERSION must match the Ray version the KubeRay RayJob declares (chart value rayJob.rayVersion).
ARG RAY_VERSION=2.60.0
ARG RAY_VARIANT=py311-cpu
FROM rayproject/ray:${RAY_VERSION}-${RAY_VARIANT}

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
# The CPU wheel index keeps the CPU image small; PyPI's default torch wheel bundles CUDA (over 5 GB).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/secvec
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 secvec_core ./secvec_core
COPY --chown=1000:100 workflows ./workflows

# torch first from the chosen index, then secvec with Ray pinned to the image's own version.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir . "ray[train,default]==${RAY_VERSION}" \
    && secvec --help > /dev/null

# The image runs as the `ray` user (uid 1000, gid 100), as the chart's securityContext expects.
USER 1000
