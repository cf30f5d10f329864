// Run the reference TypeScript packages over cases from farebox's interop tests.
//
// stdin:  a JSON array; each entry is either
//   {"jws": "<compact JWS>", "public_key": "<base64url Ed25519 key>"}  -> @peac/crypto verify()
//                                                                        + @peac/schema parse
//   {"claims": {...}}                                                   -> @peac/schema parse only
// stdout: a JSON array, one result per entry, in order:
//   {"signature_valid": bool, "header": {...}, "payload": {...}, "parse": PARSE}
//   {"parse": PARSE}
//   {"error": {"name": "...", "code": "...", "message": "..."}} when verify() throws
// where PARSE is {"ok": true, "wire_version": "0.2", "claims": {...}} or {"ok": false, "code": "..."}.
import { verify, base64urlDecode } from '@peac/crypto';
import { parseReceiptClaims } from '@peac/schema';

function parse(claims) {
  const parsed = parseReceiptClaims(claims);
  return parsed.ok
    ? { ok: true, wire_version: parsed.wireVersion, claims: parsed.claims }
    : { ok: false, code: parsed.error.code, message: parsed.error.message };
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const cases = JSON.parse(Buffer.concat(chunks).toString('utf8'));

const results = [];
for (const entry of cases) {
  if ('claims' in entry) {
    results.push({ parse: parse(entry.claims) });
    continue;
  }
  try {
    const result = await verify(entry.jws, base64urlDecode(entry.public_key));
    results.push({
      signature_valid: result.valid,
      header: result.header,
      payload: result.payload,
      parse: parse(result.payload),
    });
  } catch (err) {
    results.push({ error: { name: err?.name, code: err?.code, message: String(err?.message) } });
  }
}
process.stdout.write(JSON.stringify(results));
