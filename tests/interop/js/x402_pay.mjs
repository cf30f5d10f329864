// Pay a URL with the official TypeScript x402 client (@x402/fetch + @x402/evm, viem account).
//
// stdin: {"url": "...", "private_key": "0x...", "method": "GET",
//         "allowed_assets": [{"network": "eip155:N", "asset": "0x..."}]}   (optional: tokens beyond
//         the client's defaults, which its spend controls refuse otherwise)
// stdout: {"status": N, "body": "...", "payment_response": {...} | null, "request_headers_sent": bool}
//         or {"error": {"name": "...", "message": "..."}} when the client throws.
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from '@x402/fetch';
import { ExactEvmScheme } from '@x402/evm';
import { privateKeyToAccount } from 'viem/accounts';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));

const account = privateKeyToAccount(input.private_key);
const config = { schemes: [{ network: 'eip155:*', client: new ExactEvmScheme(account) }] };
if (input.allowed_assets) config.spendControls = { allowedAssets: input.allowed_assets };
const payingFetch = wrapFetchWithPaymentFromConfig(fetch, config);

try {
  const response = await payingFetch(input.url, { method: input.method ?? 'GET' });
  const header = response.headers.get('PAYMENT-RESPONSE');
  const out = {
    status: response.status,
    body: await response.text(),
    payment_response: header ? decodePaymentResponseHeader(header) : null,
    peac_receipt: response.headers.get('PEAC-Receipt'),
  };
  process.stdout.write(JSON.stringify(out));
} catch (err) {
  process.stdout.write(JSON.stringify({ error: { name: err?.name, message: String(err?.message ?? err) } }));
}
