# The job's image: the official Ray image matching the pinned Ray and Python, with this package installed.
# Build and push:
#   docker build -t REGISTRY/mnasnet-batch:0.1.0 . && docker push REGISTRY/mnasnet-batch:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/mnasnet-batch
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users mnasnet_batch ./mnasnet_batch
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users conf ./conf
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
    && pip install --no-cache-dir ".[s3,gcs,azure,onnx,iceberg,heif]"

# The official image's non-root user.
USER ray
ENTRYPOINT ["python", "jobs/label_images.py"]
