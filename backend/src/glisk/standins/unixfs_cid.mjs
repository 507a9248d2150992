// CIDs as IPFS computes them, by Helia's UnixFS importer (ipfs-unixfs-importer), for the Pinata
// stand-in and the tests: an implementation that is not glisk's own.
//
// Run by glisk.standins.helia with `node --input-type=module -e <this file>` from the directory
// holding the pinned node_modules (glisk.npm). Reads one JSON request per line on stdin:
//   {"data": "<base64>", "cidVersion": 1, "chunkSize": 262144, "maxChildrenPerNode": 174}
// and writes one JSON reply per line on stdout, in order: {"cid": "bafy..."} or {"error": "..."}.
// CIDv1 uses raw leaves (`ipfs add --cid-version=1`), CIDv0 dag-pb leaves (`ipfs add`); no
// wrapping directory.
import { createInterface } from 'node:readline'
import { importer } from 'ipfs-unixfs-importer'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'
import { BlackHoleBlockstore } from 'blockstore-core/black-hole'

async function cidOf (request) {
  const content = Buffer.from(request.data, 'base64')
  const cidVersion = request.cidVersion ?? 1
  const options = {
    cidVersion,
    rawLeaves: cidVersion === 1,
    chunker: fixedSize({ chunkSize: request.chunkSize ?? 262144 }),
    layout: balanced({ maxChildrenPerNode: request.maxChildrenPerNode ?? 174 })
  }
  let root
  // Only the root CID is wanted: the blocks go nowhere.
  for await (const entry of importer([{ content }], new BlackHoleBlockstore(), options)) {
    root = entry.cid
  }
  return root.toString()
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
for await (const line of lines) {
  let reply
  try {
    reply = { cid: await cidOf(JSON.parse(line)) }
  } catch (error) {
    reply = { error: String(error?.message ?? error) }
  }
  process.stdout.write(JSON.stringify(reply) + '\n')
}
