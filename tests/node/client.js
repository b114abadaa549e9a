#!/usr/bin/env node
// A Node.js client for pitchkeras.v1.ReviewService: proof that the contract in
// protos/ works from another language with nothing but the .proto file.
//
// The .proto is loaded at run time with @grpc/proto-loader (no generated code),
// so this file never drifts from the contract. Setup, once:
//
//   cd tests/node && npm ci
//
// Usage (prints one JSON object on stdout; exit 0):
//
//   node tests/node/client.js HOST:PORT get-review [--score 8] [--genre Rap]
//   node tests/node/client.js HOST:PORT get ID
//
// A failed call prints `{"error": {"code": "NOT_FOUND", "details": "..."}}` on
// stdout and exits 1; bad usage prints one line on stderr and exits 2.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
const PROTO_FILE = "pitchkeras/v1/review_service.proto";
const DEADLINE_MS = 10000; // every call gets a deadline, as the Python client does

function usage(message) {
  process.stderr.write(`client.js: error: ${message}\n` +
    "usage: client.js HOST:PORT get-review [--score S] [--genre G] | client.js HOST:PORT get ID\n");
  process.exit(2);
}

// Parse argv into {target, method, request}; proto3 `optional` fields are only set when given.
function parseArgs(argv) {
  const [target, action, ...rest] = argv;
  if (!target || !action) usage("need a target and an action");
  if (action === "get") {
    if (rest.length !== 1) usage("get takes exactly one review id");
    return { target, method: "GetById", request: { id: rest[0] } };
  }
  if (action !== "get-review") usage(`unknown action ${JSON.stringify(action)}`);
  const request = {};
  for (let i = 0; i < rest.length; i += 2) {
    const [flag, value] = [rest[i], rest[i + 1]];
    if (value === undefined) usage(`${flag} needs a value`);
    if (flag === "--score") {
      const score = Number(value);
      if (!Number.isFinite(score)) usage(`--score must be a number, got ${JSON.stringify(value)}`);
      request.score = score;
    } else if (flag === "--genre") {
      request.genre = value;
    } else {
      usage(`unknown flag ${flag}`);
    }
  }
  return { target, method: "GetReview", request };
}

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT], // google/protobuf/timestamp.proto comes bundled with protobufjs
    keepCase: true, // field names exactly as in the .proto (lower_snake_case)
    longs: String, // int64 (selection_count, seed) without losing precision
    enums: String,
    defaults: false, // absent stays absent (proto3 optional), like HasField in Python
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).pitchkeras.v1.ReviewService;
}

// proto3 leaves zero values of plain (non-optional) fields off the wire; show them as Python does.
const PLAIN_DEFAULTS = { id: "", text: "", extra_conditions: {}, length: 0, selection_count: 0, model_version: "", prompt: "" };

// The Review message as plain JSON: Timestamp -> ISO string, int64 strings -> numbers when safe.
function reviewToJson(review) {
  const out = { ...PLAIN_DEFAULTS, ...review };
  if (review.added) {
    const millis = Number(review.added.seconds || 0) * 1000 + Math.floor((review.added.nanos || 0) / 1e6);
    out.added = new Date(millis).toISOString();
  }
  for (const name of ["selection_count", "seed"]) {
    if (out[name] !== undefined && Number.isSafeInteger(Number(out[name]))) out[name] = Number(out[name]);
  }
  for (const key of Object.keys(out)) {
    if (key.startsWith("_")) delete out[key]; // proto-loader's synthetic oneofs for `optional` fields
  }
  return out;
}

function main() {
  const { target, method, request } = parseArgs(process.argv.slice(2));
  const ReviewService = loadService();
  const client = new ReviewService(target, grpc.credentials.createInsecure());
  const deadline = new Date(Date.now() + DEADLINE_MS);
  client[method](request, { deadline }, (err, response) => {
    client.close();
    if (err) {
      const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || String(err.code);
      process.stdout.write(JSON.stringify({ error: { code: name, details: err.details } }) + "\n");
      process.exitCode = 1;
      return;
    }
    process.stdout.write(JSON.stringify({ method, review: reviewToJson(response.review) }) + "\n");
  });
}

main();
