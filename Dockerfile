# dora-serve in a container: a build stage with the Rust toolchain, and a slim run stage that
# needs no network at run time (the model comes on a volume, adapters from the store).
#
#   docker build -t dora-serve .
#   docker run -p 8000:8000 -v /srv/models:/models:ro dora-serve \
#     serve --model /models/model.gguf --host 0.0.0.0 --port 8000
#
# Build with GPU support: docker build --build-arg FEATURES=cuda (on a CUDA base image).
FROM rust:1.89-bookworm AS build
ARG FEATURES=""
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bin dora-serve ${FEATURES:+--features $FEATURES} \
 && cp target/release/dora-serve /usr/local/bin/dora-serve

FROM debian:bookworm-slim
# CA roots for https object stores; nothing else is fetched at run time.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/dora-serve --create-home dora
COPY --from=build /usr/local/bin/dora-serve /usr/local/bin/dora-serve
USER dora
WORKDIR /var/lib/dora-serve
ENV DORA_ADAPTER_DISK_CACHE_DIR=/var/lib/dora-serve/adapter-cache
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ok <&3"]
ENTRYPOINT ["dora-serve"]
CMD ["serve", "--help"]
