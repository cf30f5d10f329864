// A stock @x402/express server (official middleware, @x402/evm's exact scheme) settling through
// the facilitator at a given URL: what a third-party resource server on farebox's facilitator is.
//
// stdin: {"facilitator_url": "http://127.0.0.1:N", "network": "eip155:N",
//         "routes": [{"path": "/a", "amount": "10000", "asset": "0x...", "pay_to": "0x...",
//                     "name": "USD Coin", "version": "2", "hold": false}]}
// stdout: one line {"port": N} once listening on 127.0.0.1. Each paid route answers
//         {"route": "/a", "run": k} (k counts the handler's runs); a route with "hold" answers
//         only once GET /_release was asked (so a test can act between the middleware's verify
//         and its settle). GET /_runs (free) answers the counts of every route. The process
//         exits when stdin closes.
import express from 'express';
import { paymentMiddleware, x402ResourceServer } from '@x402/express';
import { HTTPFacilitatorClient } from '@x402/core/server';
import { ExactEvmScheme } from '@x402/evm/exact/server';

// The config is the first line; stdin then stays open as the lifeline (closed: we exit).
const input = await new Promise((resolve) => {
  let buffered = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk) => {
    if (buffered === null) return;
    buffered += chunk;
    const end = buffered.indexOf('\n');
    if (end >= 0) {
      resolve(JSON.parse(buffered.slice(0, end)));
      buffered = null;
    }
  });
  process.stdin.on('end', () => process.exit(0));
});

const facilitator = new HTTPFacilitatorClient({ url: input.facilitator_url });
const server = new x402ResourceServer(facilitator).register(input.network, new ExactEvmScheme());
const routes = {};
const runs = {};
for (const route of input.routes) {
  runs[route.path] = 0;
  routes[`GET ${route.path}`] = {
    accepts: {
      scheme: 'exact',
      network: input.network,
      payTo: route.pay_to,
      maxTimeoutSeconds: 300,
      price: {
        amount: route.amount,
        asset: route.asset,
        extra: { name: route.name, version: route.version },
      },
    },
    description: `paid ${route.path}`,
    mimeType: 'application/json',
  };
}

let waiting = [];
const app = express();
app.get('/_runs', (_req, res) => res.json(runs));
app.get('/_release', (_req, res) => {
  waiting.forEach((release) => release());
  waiting = [];
  res.json({});
});
app.use(paymentMiddleware(routes, server));
for (const route of input.routes) {
  app.get(route.path, async (_req, res) => {
    runs[route.path] += 1;
    const run = runs[route.path];
    if (route.hold) await new Promise((release) => waiting.push(release));
    res.json({ route: route.path, run });
  });
}

const listener = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: listener.address().port }) + '\n');
});
