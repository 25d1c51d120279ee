# secvec runtime image: the official Ray image (Ray head, workers, the job driver and the RayJob submitter)
# with secvec installed; `secvec run` / `secvec submit` are on PATH. Used by charts/secvec and k8s/.
#   docker build -t registry.example.com/secvec:0.1.0-gpu .                       # CUDA torch (default)
#   docker build -t registry.example.com/secvec:0.1.0-cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .         # CPU torch
# One CUDA stack: the base is Ray's CPU image and CUDA comes only from torch's wheels (nvidia-* packages);
# the GPU driver is mounted from the node by the NVIDIA container toolkit.
# RAY_VERSION must match the Ray version the KubeRay RayJob declares (chart value rayJob.rayVersion) and
# the version constraints.txt pins.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cpu

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Without these the container toolkit may mount only part of the driver (compute: libcuda; utility: nvidia-smi, NVML).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /home/ray/secvec
# Dependencies first, from the project metadata and the tested versions in constraints.txt (pip install
# -c), so that editing the source does not rebuild the multi-GB dependency layer.
COPY --chown=1000:100 constraints.txt pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p.get('optional-dependencies', {}); \
print('\n'.join(p['dependencies'] + extras.get('pipeline', []) + extras.get('kube', [])))" > /tmp/requirements.txt \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt "ray[train,default]==${RAY_VERSION}" \
    && rm /tmp/requirements.txt

# Then the source, without touching the dependencies installed above.
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 secvec_core ./secvec_core
COPY --chown=1000:100 workflows ./workflows
RUN pip install --no-cache-dir --no-deps . && secvec --help > /dev/null

# The image runs as the `ray` user (uid 1000, gid 100), as the chart's securityContext expects.
USER 1000
